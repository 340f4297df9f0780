"""Datasets as tensors ``[N, C, H, W]`` float32 in ``[-1, 1]``, dataset specs, synthetic OOD sets.

A *dataset spec* names a data source everywhere (CLI, app, checkpoints):

=====================  ==============================================================
``digits``             scikit-learn's 1,797 8x8 digits (ships with scikit-learn; offline)
``mnist``              torchvision MNIST (28x28)
``fashion_mnist``      torchvision Fashion-MNIST (28x28)
``cifar10``            torchvision CIFAR-10 (3x32x32)
``cifar100``           torchvision CIFAR-100 (3x32x32)
``svhn``               torchvision SVHN (3x32x32)
``npz:PATH``           a ``.npz`` with ``x`` (uint8, N x H x W or N x H x W x 3) and ``y``
                       (int labels); or ``x_train``/``y_train``/``x_test``/``y_test``
``folder:PATH``        an image folder, one sub-folder per class (torchvision ImageFolder)
``toy:NAME``           2-D points (moons, circles, gaussians8, spirals, csv:PATH), stored as
                       ``[N, 2, 1, 1]`` in the box ``[-1, 1]^2``; see :mod:`jem_core.toy`
=====================  ==============================================================

The torchvision datasets read from a data root: ``--data-root``, else the environment
variable ``JEM_DATA_ROOT``, else ``~/.cache/jem_explorer/data``. They download when online;
offline they raise :class:`DataUnavailableError` saying where to put the files. A data root
may also hold the reduced test files ``fashion_mnist_test_2000.npz`` / ``cifar10_test_1000.npz``,
which serve the ``test`` split when the full dataset is absent.

The *demo pack* (``jem_core/demo_data/``: the whole MNIST test split and the first 2,000
Fashion-MNIST test images, with their licences) serves the ``test`` split of ``mnist`` and
``fashion_mnist`` when no data root holds them, before any download is tried, so that a fresh
offline machine evaluates the bundled MNIST models. Training splits always come from a data root.

Pixel ``p`` in ``0..255`` maps to ``p / 127.5 - 1`` (JEM's normalisation).

What does not live here: 2-D toy data (:mod:`jem_core.toy`), decoding of uploaded images
(:mod:`jem_core.images`), OOD scores and metrics (:mod:`jem_core.evaluation.ood`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .errors import BadInput

__all__ = [
    "ImageDataset",
    "DataUnavailableError",
    "BUILTIN_DATASETS",
    "SYNTHETIC_OOD",
    "DEMO_PACK_DIR",
    "demo_pack_file",
    "default_data_root",
    "resolve_data_root",
    "dataset_shape",
    "load_dataset",
    "download_dataset",
    "data_available",
    "synthetic_ood",
    "uint8_to_unit",
    "labelled_subset",
    "augment",
]

BUILTIN_DATASETS = ("digits", "mnist", "fashion_mnist", "cifar10", "cifar100", "svhn")
SYNTHETIC_OOD = ("uniform", "gaussian", "constant", "interp", "inverted")

# (channels, side, classes) of the built-in datasets.
_SHAPES = {
    "digits": (1, 8, 10),
    "mnist": (1, 28, 10),
    "fashion_mnist": (1, 28, 10),
    "cifar10": (3, 32, 10),
    "cifar100": (3, 32, 100),
    "svhn": (3, 32, 10),
}
_REDUCED_TEST_FILES = {"fashion_mnist": "fashion_mnist_test_2000.npz", "cifar10": "cifar10_test_1000.npz"}
#: Folder of the bundled demo pack (test splits only; see the module docstring).
DEMO_PACK_DIR = Path(__file__).resolve().parent / "demo_data"
_DEMO_PACK_FILES = {"mnist": "mnist_test.npz", "fashion_mnist": "fashion_mnist_test_2000.npz"}
_TV_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar10": "cifar-10-batches-py",
               "cifar100": "cifar-100-python", "svhn": "SVHN"}


class DataUnavailableError(RuntimeError):
    """A dataset could not be read or downloaded; the message says where to put the files."""


@dataclass
class ImageDataset:
    """A labelled image set held in memory.

    Attributes:
        x: ``[N, C, H, W]`` float32 in ``[-1, 1]``.
        y: ``[N]`` int64 labels in ``[0, n_classes)``.
        n_classes: number of classes K.
        name: the dataset spec it came from.
        split: ``"train"``, ``"test"`` or ``"all"``.
        class_names: K human-readable names.
        note: where the data came from when that is not obvious (e.g. a reduced test file).
    """

    x: torch.Tensor
    y: torch.Tensor
    n_classes: int
    name: str
    split: str
    class_names: list[str] = field(default_factory=list)
    note: str = ""

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.x.shape[1:])  # type: ignore[return-value]

    def subset(self, n: int | None) -> "ImageDataset":
        """The first ``n`` images (all when ``n`` is None or larger than the set)."""
        if n is None or n >= len(self):
            return self
        return ImageDataset(self.x[:n], self.y[:n], self.n_classes, self.name, self.split, self.class_names, self.note)


def default_data_root() -> Path:
    """``$JEM_DATA_ROOT`` if set, else ``~/.cache/jem_explorer/data``."""
    env = os.environ.get("JEM_DATA_ROOT")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "jem_explorer" / "data"


def resolve_data_root(data_root: str | os.PathLike | None) -> Path:
    """The data root to use: the given one, else :func:`default_data_root`."""
    return Path(data_root).expanduser() if data_root else default_data_root()


def uint8_to_unit(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 pixels ``0..255`` to float32 ``[-1, 1]`` (``p / 127.5 - 1``); layout unchanged."""
    t = torch.as_tensor(np.asarray(x))
    return t.to(torch.float32).div_(127.5).sub_(1.0)


def _hw_to_nchw(x: np.ndarray) -> np.ndarray:
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4 and x.shape[-1] in (1, 3):
        return x.transpose(0, 3, 1, 2)
    if x.ndim == 4 and x.shape[1] in (1, 3):
        return x
    raise BadInput(f"images must be N x H x W, N x H x W x C or N x C x H x W with C in (1, 3); got {x.shape}")


def _parse(spec: str) -> tuple[str, str | None]:
    if not isinstance(spec, str) or not spec:
        raise BadInput(f"dataset spec must be a non-empty string; got {spec!r}")
    if spec.startswith("npz:"):
        return "npz", spec[4:]
    if spec.startswith("folder:"):
        return "folder", spec[7:]
    if spec[:4].lower() == "toy:":
        from .toy import parse_toy_spec

        parse_toy_spec(spec)  # raises BadInput saying what is wrong
        return "toy", spec
    name = spec.lower().replace("-", "_")
    if name == "fashionmnist":
        name = "fashion_mnist"
    if name not in BUILTIN_DATASETS:
        raise BadInput(
            f"unknown dataset {spec!r}; use one of {', '.join(BUILTIN_DATASETS)}, npz:PATH or folder:PATH"
        )
    return name, None


def dataset_shape(spec: str) -> tuple[int, int, int] | None:
    """``(channels, side, n_classes)`` of a built-in dataset without loading it; None for npz/folder/toy:csv.

    Generated ``toy:`` sets give ``(2, 1, K)`` (points as ``[N, 2, 1, 1]``).

    Raises:
        BadInput: unknown or malformed spec.
    """
    name, path = _parse(spec)
    if name == "toy":
        from .toy import toy_shape

        return toy_shape(spec)
    return _SHAPES.get(name)


def data_available(spec: str, data_root: str | os.PathLike | None = None, split: str = "test") -> bool:
    """True when ``load_dataset(spec, split, data_root, download=False)`` would succeed."""
    try:
        name, path = _parse(spec)
    except ValueError:
        return False
    if name == "digits":
        return True
    if name == "toy":
        from .toy import parse_toy_spec

        s = parse_toy_spec(spec)
        return s.kind != "csv" or Path(s.path).expanduser().is_file()
    if path is not None:
        return Path(path).exists()
    root = resolve_data_root(data_root)
    if name in ("mnist", "fashion_mnist"):
        folder = root / _TV_FOLDERS[name] / "raw"
        stem = "t10k" if split == "test" else "train"
        if (folder / f"{stem}-images-idx3-ubyte").exists():
            return True
    elif (root / _TV_FOLDERS[name]).exists():
        return True
    if split != "test":
        return False
    reduced = name in _REDUCED_TEST_FILES and (root / _REDUCED_TEST_FILES[name]).exists()
    return reduced or demo_pack_file(name) is not None


def demo_pack_file(spec: str) -> Path | None:
    """The demo-pack ``.npz`` that serves ``spec``'s test split, or None when the pack has none.

    Args:
        spec: a dataset spec (``"mnist"``, ``"fashion_mnist"``; any other spec gives None).

    Returns:
        Path of an existing file with ``x`` (N x 28 x 28 uint8) and ``y`` (int64), or None.
    """
    try:
        name, _ = _parse(spec)
    except ValueError:
        return None
    f = DEMO_PACK_DIR / _DEMO_PACK_FILES.get(name, "-")
    return f if f.is_file() else None


def _split_indices(n: int, split: str, seed: int = 0) -> np.ndarray:
    perm = np.random.default_rng(seed).permutation(n)
    cut = int(round(0.8 * n))
    return {"train": perm[:cut], "test": perm[cut:], "all": np.arange(n)}[split]


def _load_digits(split: str) -> ImageDataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.images.astype(np.float32) / 16.0 * 2.0 - 1.0  # 0..16 -> [-1, 1]
    y = d.target.astype(np.int64)
    if split != "all":
        # Fixed stratified split: 1,437 train / 360 test.
        xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
        x, y = (xtr, ytr) if split == "train" else (xte, yte)
    return ImageDataset(torch.from_numpy(x[:, None].copy()), torch.from_numpy(y.copy()), 10, "digits", split,
                        [str(i) for i in range(10)])


def _load_npz(path: str, split: str, name: str) -> ImageDataset:
    p = Path(path).expanduser()
    if not p.exists():
        raise DataUnavailableError(f"npz file {p} does not exist")
    try:
        with np.load(p, allow_pickle=False) as f:
            keys = set(f.files)
            if split != "all" and {f"x_{split}", f"y_{split}"} <= keys:
                x, y = f[f"x_{split}"], f[f"y_{split}"]
                idx = None
            elif {"x", "y"} <= keys:
                x, y = f["x"], f["y"]
                idx = None if split == "all" else _split_indices(len(x), split)
            else:
                raise ValueError(f"{p} must hold arrays 'x' and 'y' (or x_train/y_train/x_test/y_test); it holds {sorted(keys)}")
    except (OSError, ValueError) as e:
        raise DataUnavailableError(f"cannot read {p}: {e}") from e
    if x.dtype != np.uint8:
        raise DataUnavailableError(f"{p}: 'x' must be uint8 pixels 0..255; got {x.dtype}")
    if len(x) != len(y):
        raise DataUnavailableError(f"{p}: 'x' has {len(x)} images but 'y' has {len(y)} labels")
    if idx is not None:
        x, y = x[idx], y[idx]
    x = _hw_to_nchw(x)
    yt = torch.as_tensor(np.asarray(y).astype(np.int64)).reshape(-1)
    k = int(yt.max()) + 1 if yt.numel() else 1
    return ImageDataset(uint8_to_unit(np.ascontiguousarray(x)), yt, max(k, 2), name, split, [str(i) for i in range(max(k, 2))])


def _load_folder(path: str, split: str, name: str, channels: int | None, size: int | None) -> ImageDataset:
    from torchvision import datasets, transforms

    p = Path(path).expanduser()
    if not p.is_dir():
        raise DataUnavailableError(f"image folder {p} does not exist (expected one sub-folder per class)")
    channels = channels or 3
    size = size or 32
    tf = [transforms.Grayscale(num_output_channels=channels)] if channels == 1 else [transforms.Lambda(lambda im: im.convert("RGB"))]
    tf += [transforms.Resize((size, size), antialias=True), transforms.PILToTensor()]
    try:
        ds = datasets.ImageFolder(str(p), transform=transforms.Compose(tf))
    except (FileNotFoundError, OSError) as e:
        raise DataUnavailableError(f"cannot read image folder {p}: {e}") from e
    idx = _split_indices(len(ds), split) if split != "all" else np.arange(len(ds))
    xs, ys = [], []
    for i in idx:
        img, label = ds[int(i)]
        xs.append(img)
        ys.append(label)
    x = uint8_to_unit(torch.stack(xs).numpy()) if xs else torch.zeros(0, channels, size, size)
    return ImageDataset(x, torch.tensor(ys, dtype=torch.int64), max(len(ds.classes), 2), name, split, list(ds.classes))


def _offline_message(name: str, root: Path, err: Exception) -> str:
    where = {
        "mnist": f"{root}/MNIST/raw/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte",
        "fashion_mnist": f"{root}/FashionMNIST/raw/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte",
        "cifar10": f"{root}/cifar-10-batches-py/ (the extracted cifar-10-python.tar.gz)",
        "cifar100": f"{root}/cifar-100-python/ (the extracted cifar-100-python.tar.gz)",
        "svhn": f"{root}/SVHN/{{train,test}}_32x32.mat",
    }[name]
    return (f"dataset {name!r} is not in data root {root} and could not be downloaded ({type(err).__name__}: {err}). "
            f"Put the files at {where}, or pass --data-root / set JEM_DATA_ROOT to a folder that has them.")


def _load_torchvision(name: str, split: str, root: Path, download: bool) -> ImageDataset:
    from torchvision import datasets

    def build(dl: bool):
        if name == "mnist":
            return datasets.MNIST(str(root), train=split == "train", download=dl)
        if name == "fashion_mnist":
            return datasets.FashionMNIST(str(root), train=split == "train", download=dl)
        if name == "cifar10":
            return datasets.CIFAR10(str(root), train=split == "train", download=dl)
        if name == "cifar100":
            return datasets.CIFAR100(str(root), train=split == "train", download=dl)
        return datasets.SVHN(str(root), split="train" if split == "train" else "test", download=dl)

    try:
        ds = build(False)
    except (RuntimeError, OSError) as first:
        reduced = root / _REDUCED_TEST_FILES.get(name, "-")
        pack = demo_pack_file(name)
        if split == "test" and (reduced.is_file() or pack is not None):
            src = reduced if reduced.is_file() else pack
            out = _load_npz(str(src), "all", name)
            where = "the data root's reduced" if src == reduced else "the bundled demo pack's"
            full = name == "mnist" and src == pack
            out.split = "test"
            out.note = f"{where} test set {src.name} ({len(out)} images{', the whole test split' if full else ''})"
            out.n_classes = _SHAPES[name][2]
            names = {"mnist": datasets.MNIST.classes, "fashion_mnist": datasets.FashionMNIST.classes}.get(name)
            out.class_names = list(names) if names else [str(i) for i in range(out.n_classes)]
            return out
        if not download:
            raise DataUnavailableError(_offline_message(name, root, first)) from first
        try:
            root.mkdir(parents=True, exist_ok=True)
            ds = build(True)
        except Exception as e:  # network errors come in many types (URLError, HTTPError, timeout)
            raise DataUnavailableError(_offline_message(name, root, e)) from e
    data = ds.data.numpy() if torch.is_tensor(ds.data) else np.asarray(ds.data)
    labels = getattr(ds, "targets", None)
    if labels is None:
        labels = ds.labels
    x = _hw_to_nchw(data) if name != "svhn" else data  # SVHN is already N x 3 x 32 x 32
    y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
    classes = list(getattr(ds, "classes", [])) or [str(i) for i in range(_SHAPES[name][2])]
    return ImageDataset(uint8_to_unit(np.ascontiguousarray(x)), y, _SHAPES[name][2], name, split, classes)


def load_dataset(spec: str, split: str = "train", data_root: str | os.PathLike | None = None,
                 download: bool = True, channels: int | None = None, size: int | None = None) -> ImageDataset:
    """Load a dataset spec into memory.

    Args:
        spec: dataset spec (see module docstring).
        split: ``"train"``, ``"test"`` or ``"all"`` (npz / folder / digits / toy only; for npz, toy and
            folder without explicit splits, train/test are a fixed 80/20 split).
        data_root: folder for torchvision datasets (default :func:`default_data_root`).
        download: try to download a missing torchvision dataset.
        channels, size: for ``folder:`` specs, the channels (1 or 3; default 3) and square side
            (pixels, default 32) images are converted to.

    Returns:
        :class:`ImageDataset` with ``x`` ``[N, C, H, W]`` float32 in ``[-1, 1]``.

    Raises:
        BadInput: unknown or malformed spec; images of an npz file that are not N x H x W (x C).
        ValueError: unknown split.
        DataUnavailableError: files missing (offline) or unreadable; the message says where to put them.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all'; got {split!r}")
    name, path = _parse(spec)
    if name == "digits":
        return _load_digits(split)
    if name == "npz":
        return _load_npz(path, split, spec)  # type: ignore[arg-type]
    if name == "folder":
        return _load_folder(path, split, spec, channels, size)  # type: ignore[arg-type]
    if name == "toy":
        from .toy import load_toy

        return load_toy(spec, split)
    if split == "all":
        raise ValueError(f"split 'all' is only for digits, npz: and folder: specs; use 'train' or 'test' for {name}")
    return _load_torchvision(name, split, resolve_data_root(data_root), download)


def download_dataset(spec: str, data_root: str | os.PathLike | None = None,
                     progress: Callable[[float, str], None] | None = None) -> Path:
    """Download MNIST or Fashion-MNIST (train and test) into a data root, file by file.

    The same files, mirrors and md5 checks as ``torchvision.datasets.MNIST.download``, with a progress
    callback per file so that a page can show a bar. Files already there are checked and kept.

    Args:
        spec: ``"mnist"`` or ``"fashion_mnist"``.
        data_root: the data root (default :func:`default_data_root`); files go to
            ``ROOT/MNIST/raw`` or ``ROOT/FashionMNIST/raw``.
        progress: called as ``progress(fraction done in [0, 1], file name)`` after each file.

    Returns:
        The raw folder that now holds the uncompressed IDX files.

    Raises:
        BadInput: another spec.
        DataUnavailableError: a file could not be fetched from any mirror (offline); the message says
            where to put the files by hand.
    """
    from urllib.error import URLError

    from torchvision import datasets
    from torchvision.datasets.utils import download_and_extract_archive

    name, _ = _parse(spec)
    classes = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST}
    if name not in classes:
        raise BadInput(f"download_dataset handles mnist and fashion_mnist; got {spec!r} (torchvision downloads "
                       "the others on first use when online)")
    root = resolve_data_root(data_root)
    raw = root / _TV_FOLDERS[name] / "raw"
    resources = classes[name].resources
    for i, (filename, md5) in enumerate(resources):
        errors = []
        for mirror in classes[name].mirrors:
            try:
                raw.mkdir(parents=True, exist_ok=True)
                download_and_extract_archive(f"{mirror}{filename}", download_root=str(raw), filename=filename, md5=md5)
                break
            except (RuntimeError, URLError, OSError) as e:  # network errors and failed md5 checks
                errors.append(e)
        else:
            raise DataUnavailableError(_offline_message(name, root, errors[-1]))
        if progress is not None:
            progress((i + 1) / len(resources), filename)
    return raw


def labelled_subset(y: torch.Tensor, labels_per_class: int, n_classes: int, seed: int = 0) -> torch.Tensor:
    """Indices of a class-balanced labelled subset, for semi-supervised training.

    Args:
        y: ``[N]`` int64 labels.
        labels_per_class: how many labelled examples to keep per class (>= 1).
        n_classes: K.
        seed: fixes the choice.

    Returns:
        ``[min(N, K * labels_per_class)]`` int64 indices into ``y``, sorted.

    Raises:
        ValueError: if ``labels_per_class < 1``.
    """
    if labels_per_class < 1:
        raise ValueError(f"labels_per_class must be >= 1; got {labels_per_class}")
    g = torch.Generator().manual_seed(seed)
    keep = []
    for k in range(n_classes):
        idx = torch.nonzero(y == k).flatten()
        keep.append(idx[torch.randperm(len(idx), generator=g)[:labels_per_class]])
    return torch.sort(torch.cat(keep)).values


def synthetic_ood(kind: str, reference: torch.Tensor, n: int | None = None,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Synthetic out-of-distribution images shaped like ``reference``.

    Kinds (Grathwohl et al. 2019, table 3, and Nalisnick et al. 2019):
    ``uniform`` U[-1, 1] noise; ``gaussian`` per-pixel N(mean, std) of the reference set,
    clamped to [-1, 1]; ``constant`` one uniform random value per image; ``interp`` the
    pixel-wise mean of two random reference images; ``inverted`` ``-x`` of reference images.

    Args:
        kind: one of :data:`SYNTHETIC_OOD`.
        reference: ``[M, C, H, W]`` float32 in ``[-1, 1]`` in-distribution images (M >= 2 for interp).
        n: number of images (default M).
        generator: random source; the same seed gives the same images.

    Returns:
        ``[n, C, H, W]`` float32 in ``[-1, 1]``.

    Raises:
        BadInput: unknown kind. ValueError: empty reference (fewer than 2 images for interp).
    """
    if reference.dim() != 4 or reference.shape[0] == 0:
        raise ValueError(f"reference must be a non-empty [M, C, H, W] tensor; got {tuple(reference.shape)}")
    m = reference.shape[0]
    n = m if n is None else int(n)
    shape = (n, *reference.shape[1:])
    g = generator
    if kind == "uniform":
        return torch.rand(shape, generator=g) * 2 - 1
    if kind == "gaussian":
        mean, std = reference.mean(0, keepdim=True), reference.std(0, keepdim=True)
        return (mean + std * torch.randn(shape, generator=g)).clamp_(-1, 1)
    if kind == "constant":
        return (torch.rand(n, 1, 1, 1, generator=g) * 2 - 1).expand(shape).contiguous()
    if kind == "interp":
        if m < 2:
            raise ValueError("interp needs at least 2 reference images")
        a = torch.randint(m, (n,), generator=g)
        b = (a + torch.randint(1, m, (n,), generator=g)) % m
        return 0.5 * (reference[a] + reference[b])
    if kind == "inverted":
        idx = torch.arange(n) % m
        return -reference[idx]
    raise BadInput(f"unknown synthetic OOD set {kind!r}; use one of {', '.join(SYNTHETIC_OOD)}")


def augment(x: torch.Tensor, crop_padding: int = 0, flip: bool = False, noise_std: float = 0.0,
            generator: torch.Generator | None = None, clamp: tuple[float, float] | None = None) -> torch.Tensor:
    """Training augmentation for a batch: random pad-and-crop, horizontal flip, Gaussian noise.

    JEM adds N(0, 0.03^2) noise to data (Grathwohl et al. 2019, appendix); CIFAR uses
    4-pixel pad-crop and flips (flip off for SVHN and digits, whose classes are not mirror-symmetric).

    Args:
        x: ``[N, C, H, W]`` float32 in ``[-1, 1]``.
        crop_padding: pixels of reflection padding before the random crop (0 = none).
        flip: random horizontal flips with probability 0.5.
        noise_std: std of added Gaussian noise in ``[-1, 1]`` units.
        generator: random source.
        clamp: ``(low, high)`` to clamp the result to (after the noise), or None to leave it
            unclamped as the official JEM code does. JEM training passes ``(-1, 1)`` whenever its SGLD
            chains are clamped, so data and samples live in the same domain.

    Returns:
        ``[N, C, H, W]`` float32, a new tensor.
    """
    n, _, h, w = x.shape
    out = x
    if crop_padding > 0:
        p = crop_padding
        padded = torch.nn.functional.pad(out, (p, p, p, p), mode="reflect")
        dy = torch.randint(0, 2 * p + 1, (n,), generator=generator)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=generator)
        rows = (dy[:, None] + torch.arange(h)[None])  # [N, H]
        cols = (dx[:, None] + torch.arange(w)[None])  # [N, W]
        out = padded[torch.arange(n)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None],
                     rows[:, None, :, None], cols[:, None, None, :]]
    if flip:
        m = torch.rand(n, generator=generator) < 0.5
        out = torch.where(m[:, None, None, None], out.flip(-1), out)
    if noise_std > 0:
        out = out + noise_std * torch.randn(out.shape, generator=generator)
    if clamp is not None:
        out = out.clamp(clamp[0], clamp[1])
    return out if out is not x else x.clone()
