"""2-D toy data and the quantities that are exact in two dimensions: ``log Z`` by quadrature, the
normalised density ``p(x)``, the exact test log-likelihood, and how far SGLD particles are from ``p(x)``;
plus :class:`ToyTrainer`, a step-by-step driver of the project's :class:`~jem_core.training.Trainer`
for live views.

Dataset specs (usable wherever a dataset spec is, e.g. ``python -m jem_core train --dataset toy:moons``):

==========================  =====================================================================
``toy:moons``               two interleaved half circles (scikit-learn ``make_moons``), 2 classes
``toy:circles``             two concentric circles, radii ratio 0.5 (``make_circles``), 2 classes
``toy:gaussians8``          eight Gaussians on a circle of radius 0.7, one class each (8 classes)
``toy:spirals``             ``k`` interleaved spiral arms (default 3), one class each
``toy:csv:PATH``            your own points: a CSV with 3 columns ``x1, x2, label`` (header optional)
==========================  =====================================================================

Options follow a ``?`` as ``key=value`` pairs joined by ``&``, e.g. ``toy:moons?noise=0.05&n=4000``:
``n`` total points (40 to 200,000; default 2,000), ``noise`` the std of the isotropic Gaussian noise in
box units (default 0.08 for moons, 0.04 for circles, 0.08 for gaussians8, 0.05 for spirals), ``seed``
(default 0) and, for spirals only, ``k`` arms (2 to 8). CSV specs take no options.

**The box.** Every point lies in :data:`BOX` ``= [-1, 1]^2``, the domain of the SGLD chains
(clamped to it) and of every density here: ``p(x) = exp(-E(x)) / Z`` with ``Z = ∫_box exp(-E(x)) dx``.
The noise-free shapes are mapped by a fixed affine map into ``[-0.75, 0.75]^2`` (moons: ``(x - (0.5,
0.25)) / 2``; circles: ``0.75 x``); noisy points that fall outside the box are redrawn, so no data is
clipped onto its edge. CSV points are shifted and scaled, the same factor for both axes, so that their
bounding box is centred and its longer side spans ``[-0.75, 0.75]``; the map is stated in the dataset's
``note``. The train/test split is a fixed 80/20 split of the points.

Points are stored as ``[N, 2, 1, 1]`` float32 ("2-channel 1x1 images"), so the trainer, the replay
buffer (uniform on the box), augmentation, clamping and checkpoints treat them like any image set;
:class:`~jem_core.models.MLP` flattens them.

**Quadrature.** :func:`log_z_quadrature` applies the midpoint rule on a ``G x G`` grid of cell centres:
``Z ≈ h^2 Σ exp(-E(c_ij))`` with ``h = 2 / G``, summed as a log-sum-exp in float64. For a smooth energy its
error is ``O(h^2)`` (e.g. Press et al., *Numerical Recipes*, 3rd ed., sec. 4.1-4.3), so comparing with the
``G/2`` grid estimates it: ``err(G) ≈ |log Z_G - log Z_{G/2}| / 3`` (Richardson). That estimate is the
``error`` reported with every value.

What does not live here: the trainer it drives (:mod:`jem_core.training`), the MLP (:mod:`jem_core.models`),
AIS (:mod:`jem_core.likelihood`), the 2-D playground page (``pages/playground.py``).
"""

from __future__ import annotations

import collections
import csv
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qsl

import numpy as np
import torch
from torch import nn

from .data import DataUnavailableError, ImageDataset
from .energy import energy as energy_of_logits
from .errors import BadInput

__all__ = ["BOX", "TOY_DATASETS", "ToySpec", "parse_toy_spec", "is_toy_spec", "toy_shape", "load_toy",
           "points_of", "grid_points", "Quadrature", "log_z_quadrature", "DensityGrid", "density_grid",
           "exact_log_likelihood", "bin_probabilities", "sample_grid", "histogram_distance",
           "histogram_distance_floor", "sampler_fidelity", "ToySettings", "DIVERGE_PRESET", "ToyTrainer",
           "ais_log_z", "copy_state", "pretrained_pair", "save_points_png"]

#: The domain of every toy density and chain: ``[BOX[0], BOX[1]]^2``.
BOX = (-1.0, 1.0)
#: Built-in toy datasets: name -> (default noise std in box units, number of classes; None = option ``k``).
TOY_DATASETS: dict[str, tuple[float, int | None]] = {
    "moons": (0.08, 2), "circles": (0.04, 2), "gaussians8": (0.08, 8), "spirals": (0.05, None)}
_SHAPE_HALF = 0.75          # noise-free shapes fill [-0.75, 0.75]^2
_MAX_POINTS = 200_000
_MAX_CLASSES = 10           # the dashboard has 10 class colours


@dataclass(frozen=True)
class ToySpec:
    """A parsed ``toy:`` dataset spec.

    Attributes:
        kind: ``"moons"``, ``"circles"``, ``"gaussians8"``, ``"spirals"`` or ``"csv"``.
        n: total number of points (train + test) for generated sets; 0 for CSV.
        noise: Gaussian noise std in box units (generated sets).
        seed: random seed of the generator and of nothing else.
        k: number of classes (spiral arms); for CSV 0 until the file is read.
        path: the CSV file (``kind == "csv"``), else ``""``.
    """

    kind: str
    n: int = 2000
    noise: float = 0.0
    seed: int = 0
    k: int = 2
    path: str = ""


def is_toy_spec(spec: Any) -> bool:
    """True for strings starting with ``toy:`` (case-insensitive)."""
    return isinstance(spec, str) and spec[:4].lower() == "toy:"


def parse_toy_spec(spec: str) -> ToySpec:
    """Parse ``toy:NAME[?key=value&...]`` or ``toy:csv:PATH`` (grammar in the module docstring).

    Raises:
        BadInput: not a toy spec, unknown name, unknown option, or an option value out of range;
            the message lists what is accepted.
    """
    if not is_toy_spec(spec):
        raise BadInput(f"not a toy dataset spec: {spec!r} (toy specs start with 'toy:')")
    body = spec[4:]
    if body.lower().startswith("csv:"):
        path = body[4:]
        if not path:
            raise BadInput("toy:csv: needs a file path, e.g. toy:csv:points.csv (3 columns: x1, x2, label)")
        return ToySpec("csv", n=0, path=path, k=0)
    name, _, query = body.partition("?")
    name = name.strip().lower()
    if name not in TOY_DATASETS:
        raise BadInput(f"unknown toy dataset {name!r} in {spec!r}; use one of "
                         f"{', '.join('toy:' + k for k in TOY_DATASETS)} or toy:csv:PATH")
    noise, k = TOY_DATASETS[name]
    opts: dict[str, Any] = {"n": 2000, "noise": noise, "seed": 0, "k": k or 3}
    allowed = {"n", "noise", "seed"} | ({"k"} if k is None else set())
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError as e:
        raise BadInput(f"cannot read the options of {spec!r}: write them as ?key=value&key=value ({e})") from e
    for key, value in pairs:
        key = key.strip().lower()
        if key not in allowed:
            raise BadInput(f"unknown option {key!r} for toy:{name}; accepted: {', '.join(sorted(allowed))}")
        try:
            opts[key] = float(value) if key == "noise" else int(value)
        except ValueError as e:
            raise BadInput(f"option {key}={value!r} of {spec!r} must be a {'number' if key == 'noise' else 'whole number'}") from e
    if not 40 <= opts["n"] <= _MAX_POINTS:
        raise BadInput(f"n must lie in [40, {_MAX_POINTS}] for {spec!r}; got {opts['n']}")
    if not (opts["noise"] >= 0 and math.isfinite(opts["noise"]) and opts["noise"] <= 0.5):
        raise BadInput(f"noise must lie in [0, 0.5] (box units; the box is [-1, 1]^2) for {spec!r}; got {opts['noise']}")
    if not 2 <= opts["k"] <= 8:
        raise BadInput(f"k (spiral arms) must lie in [2, 8] for {spec!r}; got {opts['k']}")
    return ToySpec(name, n=int(opts["n"]), noise=float(opts["noise"]), seed=int(opts["seed"]), k=int(opts["k"]))


def toy_shape(spec: str) -> tuple[int, int, int] | None:
    """``(2, 1, n_classes)`` of a generated toy set without generating it; None for ``toy:csv:``.

    Raises:
        BadInput: malformed spec (see :func:`parse_toy_spec`).
    """
    s = parse_toy_spec(spec)
    return None if s.kind == "csv" else (2, 1, s.k)


# ------------------------------------------------------------------------------------------ generators
def _shape_points(s: ToySpec, m: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``m`` noisy points ``[m, 2]`` float64 in box units (not yet restricted to the box) and labels ``[m]``."""
    from sklearn.datasets import make_circles, make_moons

    rs = int(rng.integers(2**31 - 1))
    if s.kind == "moons":  # native shape: x1 in [-1, 2], x2 in [-0.5, 1]; scale 0.5
        x, y = make_moons(m, noise=s.noise / 0.5, random_state=rs)
        return (x - np.array([0.5, 0.25])) * 0.5, y
    if s.kind == "circles":  # native: outer radius 1
        x, y = make_circles(m, noise=s.noise / _SHAPE_HALF, factor=0.5, random_state=rs)
        return x * _SHAPE_HALF, y
    if s.kind == "gaussians8":
        y = rng.integers(0, 8, m)
        ang = 2 * np.pi * y / 8
        centres = 0.7 * np.stack([np.cos(ang), np.sin(ang)], 1)
        return centres + s.noise * rng.standard_normal((m, 2)), y
    # spirals: arm j at angle 2 pi j / k, radius 0.1 -> 0.75 over 1.25 turns
    y = rng.integers(0, s.k, m)
    t = np.sqrt(rng.random(m))  # more points on the longer outer part
    r = 0.1 + (_SHAPE_HALF - 0.1) * t
    ang = 2 * np.pi * y / s.k + 2.5 * np.pi * t
    return np.stack([r * np.cos(ang), r * np.sin(ang)], 1) + s.noise * rng.standard_normal((m, 2)), y


def _generate(s: ToySpec) -> tuple[np.ndarray, np.ndarray]:
    """``s.n`` points ``[n, 2]`` in the box and labels, redrawing points that fall outside."""
    rng = np.random.default_rng(s.seed)
    xs, ys, have = [], [], 0
    for _ in range(100):
        m = max(64, int((s.n - have) * 1.1) + 16)
        x, y = _shape_points(s, m, rng)
        keep = np.all((x > BOX[0]) & (x < BOX[1]), axis=1)
        xs.append(x[keep])
        ys.append(y[keep])
        have += int(keep.sum())
        if have >= s.n:
            break
    else:
        raise BadInput(f"noise {s.noise} puts too many toy:{s.kind} points outside the box [-1, 1]^2; lower it")
    x, y = np.concatenate(xs)[: s.n], np.concatenate(ys)[: s.n]
    return x, y.astype(np.int64)


def _read_csv(path: str) -> tuple[np.ndarray, np.ndarray, list[str], str]:
    """Points ``[N, 2]`` scaled into the box, labels ``[N]``, class names and a note saying the map used.

    Raises:
        DataUnavailableError: missing file or bad contents (the message names the row and what to fix).
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataUnavailableError(f"toy:csv: file {p} does not exist (expected a CSV with 3 columns: x1, x2, label)")
    pts: list[tuple[float, float]] = []
    labels: list[str] = []
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            for i, row in enumerate(csv.reader(f), start=1):
                row = [c.strip() for c in row]
                if not row or all(not c for c in row):
                    continue
                if len(row) != 3:
                    raise DataUnavailableError(
                        f"toy:csv: {p}, row {i}: expected 3 columns (x1, x2, label); got {len(row)}: {row[:5]}. "
                        "Write one point per row as x1,x2,label")
                try:
                    a, b = float(row[0]), float(row[1])
                except ValueError:
                    if not pts and not labels:  # a header row
                        continue
                    raise DataUnavailableError(f"toy:csv: {p}, row {i}: coordinates must be numbers; got {row[:2]}") from None
                if not (math.isfinite(a) and math.isfinite(b)):
                    raise DataUnavailableError(f"toy:csv: {p}, row {i}: coordinates must be finite; got {row[:2]}")
                if not row[2]:
                    raise DataUnavailableError(f"toy:csv: {p}, row {i}: the label (3rd column) is empty")
                pts.append((a, b))
                labels.append(row[2])
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataUnavailableError(f"toy:csv: cannot read {p}: {e}") from e
    if len(pts) < 10:
        raise DataUnavailableError(f"toy:csv: {p} holds {len(pts)} points; need at least 10 (rows of x1,x2,label)")
    names = sorted(set(labels))
    if all(n.lstrip("-").isdigit() for n in names):
        ints = np.array([int(v) for v in labels])
        if ints.min() < 0:
            raise DataUnavailableError(f"toy:csv: {p}: integer labels must be >= 0; got {ints.min()}")
        k = int(ints.max()) + 1
        y, class_names = ints, [str(i) for i in range(k)]
    else:
        index = {n: i for i, n in enumerate(names)}
        y, class_names = np.array([index[v] for v in labels]), names
    if len(set(y.tolist())) < 2 or len(class_names) > _MAX_CLASSES:
        raise DataUnavailableError(f"toy:csv: {p}: need 2 to {_MAX_CLASSES} classes; got {len(class_names)} "
                                   f"({', '.join(class_names[:12])})")
    x = np.asarray(pts, dtype=np.float64)
    lo, hi = x.min(0), x.max(0)
    centre, half = (lo + hi) / 2, float((hi - lo).max()) / 2
    if half <= 0:
        raise DataUnavailableError(f"toy:csv: {p}: all points are the same; nothing to learn")
    scale = _SHAPE_HALF / half
    note = (f"{len(x)} points from {p.name}, mapped into the box by (x - ({centre[0]:.4g}, {centre[1]:.4g})) "
            f"* {scale:.4g}")
    return (x - centre) * scale, y.astype(np.int64), class_names, note


def load_toy(spec: str, split: str = "train") -> ImageDataset:
    """Generate (or read) a toy dataset.

    Args:
        spec: a ``toy:`` spec (module docstring).
        split: ``"train"`` (80%), ``"test"`` (20%) or ``"all"``.

    Returns:
        :class:`~jem_core.data.ImageDataset` with ``x`` ``[N, 2, 1, 1]`` float32 inside the box
        ``[-1, 1]^2`` and ``y`` ``[N]`` int64; the same spec always gives the same points.

    Raises:
        BadInput: malformed spec, or noise that puts too many points outside the box.
        ValueError: unknown split.
        DataUnavailableError: a CSV that is missing or malformed.
    """
    from .data import _split_indices

    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all'; got {split!r}")
    s = parse_toy_spec(spec)
    if s.kind == "csv":
        x, y, names, note = _read_csv(s.path)
    else:
        x, y = _generate(s)
        names = [f"{s.kind} {i}" if s.kind in ("gaussians8", "spirals") else f"class {i}" for i in range(s.k)]
        note = f"{len(x)} generated points (noise {s.noise:g}, seed {s.seed}) in the box [-1, 1]^2"
    if split != "all":
        idx = _split_indices(len(x), split, seed=s.seed)
        x, y = x[idx], y[idx]
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).view(-1, 2, 1, 1)
    return ImageDataset(xt, torch.from_numpy(np.ascontiguousarray(y)), len(names), spec, split, names, note)


def points_of(x: torch.Tensor) -> torch.Tensor:
    """``[N, 2]`` view of points given as ``[N, 2]`` or ``[N, 2, 1, 1]``.

    Raises:
        ValueError: any other shape.
    """
    if x.dim() == 2 and x.shape[1] == 2:
        return x
    if x.dim() == 4 and tuple(x.shape[1:]) == (2, 1, 1):
        return x.reshape(-1, 2)
    raise ValueError(f"points must be [N, 2] or [N, 2, 1, 1]; got {tuple(x.shape)}")


# ------------------------------------------------------------------------------------------ quadrature
def grid_points(resolution: int, box: tuple[float, float] = BOX) -> tuple[torch.Tensor, torch.Tensor]:
    """Cell centres of a ``G x G`` grid over ``box^2``.

    Returns:
        ``(xs [G] float64, points [G*G, 2] float32)``; row ``i * G + j`` of ``points`` is
        ``(xs[j], xs[i])``, so values reshaped to ``[G, G]`` are indexed ``[y, x]`` (a plotly heat map's order).

    Raises:
        ValueError: ``resolution < 2``.
    """
    if resolution < 2:
        raise ValueError(f"grid resolution must be >= 2; got {resolution}")
    lo, hi = box
    h = (hi - lo) / resolution
    xs = lo + h * (torch.arange(resolution, dtype=torch.float64) + 0.5)
    gy, gx = torch.meshgrid(xs, xs, indexing="ij")
    return xs, torch.stack([gx.reshape(-1), gy.reshape(-1)], 1).float()


EnergyFn = Callable[[torch.Tensor], torch.Tensor]


@torch.no_grad()
def _model_outputs(model: nn.Module | EnergyFn, pts: torch.Tensor, batch_size: int = 16384
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Energies ``[M]`` float64 (and logits ``[M, K]`` float32 for a module; else None) at points ``[M, 2]``."""
    if isinstance(model, nn.Module):
        dev = next(model.parameters()).device
        was = model.training
        model.eval()
        try:
            logits = torch.cat([model(pts[i:i + batch_size].view(-1, 2, 1, 1).to(dev)).float().cpu()
                                for i in range(0, len(pts), batch_size)])
        finally:
            model.train(was)
        return energy_of_logits(logits).double(), logits
    e = torch.cat([torch.as_tensor(model(pts[i:i + batch_size])).reshape(-1) for i in range(0, len(pts), batch_size)])
    return e.double().cpu(), None


def _log_z(e: torch.Tensor, resolution: int, box: tuple[float, float]) -> float:
    h = (box[1] - box[0]) / resolution
    return float(torch.logsumexp(-e, 0)) + 2 * math.log(h)


@dataclass
class Quadrature:
    """``log Z`` of ``exp(-E)`` over ``box^2`` by the midpoint rule.

    Attributes:
        log_z: the value on the ``resolution x resolution`` grid (nats).
        error: estimated absolute error of ``log_z``, ``|log_z - log_z_coarse| / 3`` (Richardson for the
            midpoint rule's ``O(h^2)`` error; valid for smooth energies, e.g. SiLU networks).
        log_z_coarse: the value on the ``resolution // 2`` grid.
        resolution: grid points per axis.
        box: the integration domain per axis.
    """

    log_z: float
    error: float
    log_z_coarse: float
    resolution: int
    box: tuple[float, float] = BOX


def log_z_quadrature(model: nn.Module | EnergyFn, resolution: int = 256, box: tuple[float, float] = BOX
                     ) -> Quadrature:
    """``log Z = log ∫_box exp(-E(x)) dx`` for a 2-D energy, by the midpoint rule (module docstring).

    Args:
        model: a classifier (``[N, 2, 1, 1] -> logits [N, K]``; ``E(x) = -logsumexp_y f(x)[y]``, JEM eq. 5)
            or a function ``points [M, 2] float32 -> energies [M]``.
        resolution: grid points per axis ``G`` (>= 4, even); cost ``1.25 G^2`` energy evaluations.
        box: ``(low, high)`` of the square domain.

    Returns:
        :class:`Quadrature` (nats).

    Raises:
        ValueError: ``resolution`` odd or below 4.
    """
    if resolution < 4 or resolution % 2:
        raise ValueError(f"resolution must be an even number >= 4; got {resolution}")
    e_fine, _ = _model_outputs(model, grid_points(resolution, box)[1])
    e_coarse, _ = _model_outputs(model, grid_points(resolution // 2, box)[1])
    fine, coarse = _log_z(e_fine, resolution, box), _log_z(e_coarse, resolution // 2, box)
    return Quadrature(fine, abs(fine - coarse) / 3, coarse, resolution, box)


@dataclass
class DensityGrid:
    """A 2-D model evaluated on a grid: normalised density, energy and class probabilities.

    Attributes:
        xs: ``[G]`` float64 cell centres (the same on both axes).
        log_p: ``[G, G]`` float64 ``log p(x) = -E(x) - log Z`` in nats, indexed ``[y, x]``.
        energy: ``[G, G]`` float64 ``E(x)``.
        probs: ``[G, G, K]`` float32 ``p(y|x)``.
        log_z: ``log Z`` on this grid (nats); ``log_z_error`` its estimated error (see :class:`Quadrature`).
        resolution: ``G``; box: the domain per axis.
    """

    xs: np.ndarray
    log_p: np.ndarray
    energy: np.ndarray
    probs: np.ndarray
    log_z: float
    log_z_error: float
    resolution: int
    box: tuple[float, float] = BOX

    @property
    def cell_area(self) -> float:
        """Area of one grid cell, ``((high - low) / G)^2``."""
        return ((self.box[1] - self.box[0]) / self.resolution) ** 2

    def integral(self) -> float:
        """``Σ p(c_ij) h^2``: 1 up to rounding, by construction (the density is normalised on this grid)."""
        return float(np.exp(self.log_p).sum() * self.cell_area)


def density_grid(model: nn.Module, resolution: int = 128, box: tuple[float, float] = BOX) -> DensityGrid:
    """Evaluate a 2-D classifier on a ``G x G`` grid: ``p(x)`` normalised by quadrature, ``E(x)``, ``p(y|x)``.

    Args:
        model: ``[N, 2, 1, 1] -> logits [N, K]`` (a JEM or its backbone).
        resolution: ``G`` (even, >= 4); the ``G/2`` grid is evaluated too, for the error estimate.
        box: ``(low, high)`` per axis.

    Returns:
        :class:`DensityGrid`.

    Raises:
        ValueError: bad resolution.
    """
    if resolution < 4 or resolution % 2:
        raise ValueError(f"resolution must be an even number >= 4; got {resolution}")
    xs, pts = grid_points(resolution, box)
    e, logits = _model_outputs(model, pts)
    e_coarse, _ = _model_outputs(model, grid_points(resolution // 2, box)[1])
    log_z = _log_z(e, resolution, box)
    err = abs(log_z - _log_z(e_coarse, resolution // 2, box)) / 3
    g = resolution
    assert logits is not None
    probs = torch.softmax(logits, 1).reshape(g, g, -1).numpy()
    e2 = e.reshape(g, g).numpy()
    return DensityGrid(xs.numpy(), -e2 - log_z, e2, probs, log_z, err, g, box)


@torch.no_grad()
def exact_log_likelihood(model: nn.Module, x: torch.Tensor, log_z: float) -> torch.Tensor:
    """Exact ``log p(x) = -E(x) - log Z`` (nats) of points under a 2-D JEM normalised on the box.

    Args:
        model: ``[N, 2, 1, 1] -> logits [N, K]``.
        x: ``[N, 2]`` or ``[N, 2, 1, 1]`` points.
        log_z: from :func:`log_z_quadrature` or :func:`density_grid` (same box).

    Returns:
        ``[N]`` float64; ``-inf`` for points outside the box (the density is 0 there).
    """
    p = points_of(x).float()
    e, _ = _model_outputs(model, p)
    out = -e - log_z
    inside = ((p > BOX[0]) & (p < BOX[1])).all(1)
    return torch.where(inside, out, torch.full_like(out, -math.inf))


# ------------------------------------------------------------------------------ particles vs p(x)
def bin_probabilities(grid: DensityGrid, bins: int) -> np.ndarray:
    """``p(x)`` integrated over ``bins x bins`` equal squares of the box: ``[bins, bins]`` float64 summing to 1.

    Raises:
        ValueError: ``grid.resolution`` not a multiple of ``bins``.
    """
    if bins < 1 or grid.resolution % bins:
        raise ValueError(f"the grid resolution {grid.resolution} must be a multiple of bins ({bins})")
    f = grid.resolution // bins
    p = np.exp(grid.log_p) * grid.cell_area
    p = p.reshape(bins, f, bins, f).sum((1, 3))
    return p / p.sum()


def _histogram(points: torch.Tensor, bins: int, box: tuple[float, float]) -> tuple[np.ndarray, int]:
    """Counts ``[bins, bins]`` (indexed ``[y, x]``) of the points inside the box, and how many lie outside."""
    p = points_of(points).detach().double().cpu().numpy()
    inside = np.all(np.isfinite(p) & (p >= box[0]) & (p <= box[1]), axis=1)
    q = p[inside]
    h, _, _ = np.histogram2d(q[:, 1], q[:, 0], bins=bins, range=[box, box])
    return h, int((~inside).sum())


def histogram_distance(particles: torch.Tensor, grid: DensityGrid, bins: int = 16) -> float:
    """Total-variation distance between the particles' 2-D histogram and ``p(x)`` on the same bins.

    ``TV = 1/2 Σ_b |n_b / n - P_b| + 1/2 (n_out / n)``, ``P_b`` from :func:`bin_probabilities`; particles
    outside the box (where ``p = 0``) count fully. In ``[0, 1]``: 0 = same bin masses, 1 = disjoint.
    Even exact samples get a positive value from finite ``n``: compare with :func:`histogram_distance_floor`.

    Args:
        particles: ``[n, 2]`` or ``[n, 2, 1, 1]``.
        grid: the model's :class:`DensityGrid` (``resolution`` a multiple of ``bins``).
        bins: bins per axis.

    Raises:
        ValueError: no particles, or a resolution that ``bins`` does not divide.
    """
    n = points_of(particles).shape[0]
    if n == 0:
        raise ValueError("need at least one particle")
    counts, outside = _histogram(particles, bins, grid.box)
    pb = bin_probabilities(grid, bins)
    return float(0.5 * np.abs(counts / n - pb).sum() + 0.5 * outside / n)


def sample_grid(grid: DensityGrid, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` exact draws ``[n, 2]`` float32 from the grid's piecewise-constant ``p(x)``: a cell with
    probability ``p(c) h^2``, then a uniform point in it (what a perfect sampler of the model returns, up
    to the grid's resolution)."""
    w = torch.from_numpy(np.exp(grid.log_p).reshape(-1))
    cells = torch.multinomial(w, n, replacement=True, generator=generator)
    h = (grid.box[1] - grid.box[0]) / grid.resolution
    iy, ix = cells // grid.resolution, cells % grid.resolution
    u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
    x = grid.box[0] + h * (ix.double() + u[:, 0])
    y = grid.box[0] + h * (iy.double() + u[:, 1])
    return torch.stack([x, y], 1).float()


def histogram_distance_floor(grid: DensityGrid, n: int, bins: int = 16, repeats: int = 5, seed: int = 0
                             ) -> tuple[float, float]:
    """Mean and std of :func:`histogram_distance` for ``n`` exact draws (:func:`sample_grid`) over ``repeats``
    draws: the finite-sample value a perfect sampler would get."""
    g = torch.Generator().manual_seed(seed)
    v = np.array([histogram_distance(sample_grid(grid, n, g), grid, bins) for _ in range(repeats)])
    return float(v.mean()), float(v.std())


def sampler_fidelity(model: nn.Module, grid: DensityGrid, n: int = 2000, bins: int = 16, seed: int = 0,
                     exact_step: float = 1e-3, exact_steps: int = 4000, practical_steps: int = 100,
                     start: torch.Tensor | None = None) -> dict[str, Any]:
    """Does SGLD sample the model? Histogram distance to ``p(x)`` of particles after exact Langevin with a
    small step vs JEM's practical SGLD (step 1, noise 0.01), from the same starts.

    Exact Langevin ``x <- x - (a/2) dE/dx + sqrt(a) N(0, I)`` has ``p(x)`` as its limit as ``a -> 0``
    (Welling & Teh 2011; Roberts & Tweedie 1996); the practical setting is Langevin at temperature
    ``T = noise^2 / (2 step) = 5e-5``, i.e. ``exp(-E/T)``: particles pile up in the energy minima. Both
    clamp to the box.

    Args:
        model: ``[N, 2, 1, 1] -> logits``.
        grid: its :class:`DensityGrid`.
        n: particles; bins: histogram bins per axis.
        exact_step: ``a`` of exact Langevin; exact_steps: its number of steps (mixing across the box
            needs ``exact_steps * exact_step`` of order 1 or more).
        practical_steps: steps of the practical sampler.
        start: ``[n, 2, 1, 1]`` starts (default ``U[-1, 1]^2``).

    Returns:
        ``{"exact": TV, "practical": TV, "floor": mean TV of n exact draws, "floor_std", "n", "bins",
        "exact_step", "exact_steps", "practical_steps", "seconds"}``.
    """
    from .sampling import SGLDSampler, frozen_parameters, init_noise

    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    x0 = start if start is not None else init_noise(n, (2, 1, 1), g)
    was = model.training
    model.eval()
    try:
        with frozen_parameters(model):
            exact = SGLDSampler(model, exact_step, exact_langevin=True, clamp=True,
                                generator=torch.Generator().manual_seed(seed + 1)).run(x0, exact_steps)
            practical = SGLDSampler(model, 1.0, 0.01, clamp=True,
                                    generator=torch.Generator().manual_seed(seed + 2)).run(x0, practical_steps)
    finally:
        model.train(was)
    floor, floor_std = histogram_distance_floor(grid, len(x0), bins, seed=seed + 3)
    return {"exact": histogram_distance(exact, grid, bins), "practical": histogram_distance(practical, grid, bins),
            "floor": floor, "floor_std": floor_std, "n": len(x0), "bins": bins, "exact_step": exact_step,
            "exact_steps": exact_steps, "practical_steps": practical_steps,
            "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------- step-by-step trainer
@dataclass
class ToySettings:
    """The settings a live view may change between training steps.

    Attributes:
        sgld_steps: SGLD steps per training iteration (>= 0).
        step_size: SGLD step size (box units; the gradient coefficient, or ``a`` with ``exact_langevin``).
        noise: SGLD noise std (box units); ignored with ``exact_langevin`` (then ``sqrt(step_size)``).
        exact_langevin: ``x <- x - (a/2) dE/dx + sqrt(a) N(0, I)`` (see :mod:`jem_core.sampling`).
        px_weight: weight of the ``E(data) - E(samples)`` term (JEM eq. 2-3).
        lr: Adam learning rate (before warm-up and the guard's back-off).
        clamp: clamp chains (and the noisy data) to the box.

    The defaults are exact Langevin with ``a = 1e-3`` and learning rate 0.01: on ``toy:moons`` this reaches
    ~98% test accuracy in 500 iterations, while JEM's image setting (step 1, noise 0.01) diverges at
    that learning rate (in 2-D the gradient per coordinate is large and a step of 1 crosses the box).
    """

    sgld_steps: int = 20
    step_size: float = 1e-3
    noise: float = 0.01
    exact_langevin: bool = True
    px_weight: float = 1.0
    lr: float = 1e-2
    clamp: bool = True


#: "Make it diverge": JEM's image sampler (step 1, noise 0.01) without clamping and a p(x) weight of 10.
DIVERGE_PRESET = ToySettings(sgld_steps=20, step_size=1.0, noise=0.01, exact_langevin=False, px_weight=10.0,
                             lr=1e-2, clamp=False)


class ToyTrainer:
    """Drives a JEM or baseline on a 2-D toy set step by step, with live SGLD chains and exact metrics.

    Training is the project's :class:`~jem_core.training.Trainer` (same objective, replay buffer, SGLD
    and divergence guard), one :meth:`~jem_core.training.Trainer.guarded_step` at a time, so a caller can
    change :class:`ToySettings` between steps. Memory is bounded: ``history_limit`` measurements (older
    ones are thinned, every other one dropped, so the curve keeps its whole time range), ``trail_length``
    positions of ``n_chains`` live chains, and the trainer's own bounded state.

    Args:
        dataset: a ``toy:`` spec.
        objective: ``"jem"`` or ``"baseline"`` (cross-entropy only; its ``logsumexp`` still defines a density).
        seed: seeds the model initialisation, batches, buffer and chains (JEM and baseline built with the
            same seed start from the same weights and see the same batches).
        settings: initial :class:`ToySettings`.
        buffer_size: replay buffer rows; batch_size: points per iteration; warmup_iters: linear warm-up.
        max_retries: divergence recoveries before the guard gives up (then :attr:`diverged` is set).
        n_chains: live SGLD chains (display only; they do not train the model), restarted from ``U[-1, 1]^2``
            every ``restart_every`` calls of :meth:`advance_chains`; trail_length: positions kept per chain.
        history_limit: measurements kept (>= 4).
        data: optional ``(train, test)`` datasets (else loaded from ``dataset``).
        labels_per_class: semi-supervised: cross-entropy sees only this many labelled training points per
            class (the same ones for JEM and baseline with the same seed); JEM's ``p(x)`` term sees all.

    Raises:
        ValueError: malformed spec or settings; :class:`~jem_core.data.DataUnavailableError`: unreadable CSV.
    """

    def __init__(self, dataset: str = "toy:moons", objective: str = "jem", seed: int = 0,
                 settings: ToySettings | None = None, buffer_size: int = 2000, batch_size: int = 64,
                 warmup_iters: int = 50, max_retries: int = 5, n_chains: int = 48, trail_length: int = 10,
                 restart_every: int = 60, history_limit: int = 300,
                 data: tuple[ImageDataset, ImageDataset] | None = None, labels_per_class: int | None = None):
        from .sampling import SGLDSampler, init_noise
        from .training import TrainConfig, Trainer

        s = settings or ToySettings()
        train, test = data if data is not None else (load_toy(dataset, "train"), load_toy(dataset, "test"))
        cfg = TrainConfig(dataset=dataset, objective=objective, epochs=1, batch_size=batch_size, lr=s.lr,
                          warmup_iters=warmup_iters, px_weight=s.px_weight, sgld_steps=s.sgld_steps,
                          sgld_step_size=s.step_size, sgld_noise=s.noise, exact_langevin=s.exact_langevin,
                          sgld_clamp=s.clamp, buffer_size=buffer_size, seed=seed, device="cpu",
                          max_retries=max_retries, n_reference=500, keep_buffer=200,
                          labels_per_class=labels_per_class)
        self.dataset, self.objective, self.seed = dataset, objective, seed
        self.trainer = Trainer(cfg, train_set=train, test_set=test)
        self.trainer.model.train()
        self.trainer.take_snapshot()
        self.settings = ToySettings(**asdict(s))
        self.chain_gen = torch.Generator().manual_seed(seed + 21)
        self.chain_sampler = SGLDSampler(self.trainer.model, s.step_size, s.noise, s.exact_langevin, clamp=s.clamp,
                                         generator=self.chain_gen)
        self.n_chains, self.restart_every = n_chains, max(1, restart_every)
        self.chains = init_noise(n_chains, (2, 1, 1), self.chain_gen)
        self.trail: collections.deque[torch.Tensor] = collections.deque(maxlen=max(1, trail_length))
        self._chain_calls = 0
        self.history_limit = max(4, history_limit)
        self.history: list[dict[str, float]] = []
        self.recent: collections.deque[dict[str, float]] = collections.deque(maxlen=25)
        self._queue: collections.deque = collections.deque()
        self.diverged: str | None = None
        self.seconds = 0.0

    # -- settings and training --------------------------------------------------------------------------
    @property
    def iteration(self) -> int:
        """Optimizer steps taken so far (rolled-back iterations do not count)."""
        return self.trainer.iteration

    @property
    def events(self) -> list[dict]:
        """The divergence guard's roll-backs so far (at most ``max_retries + 1``)."""
        return self.trainer.events

    @property
    def model(self) -> nn.Module:
        """The :class:`~jem_core.energy.JEM` being trained."""
        return self.trainer.model

    def apply(self, settings: ToySettings) -> None:
        """Use ``settings`` from the next step on (the baseline uses only ``lr``).

        Raises:
            ValueError: a non-positive step size or learning rate, a negative noise, steps or weight.
        """
        s = settings
        if not (s.lr > 0 and s.step_size > 0 and s.noise >= 0 and s.sgld_steps >= 0 and s.px_weight >= 0):
            raise ValueError(f"settings out of range: {s}")
        c = self.trainer.cfg
        c.lr, c.px_weight, c.sgld_steps, c.sgld_clamp = float(s.lr), float(s.px_weight), int(s.sgld_steps), bool(s.clamp)
        c.sgld_step_size, c.sgld_noise, c.exact_langevin = float(s.step_size), float(s.noise), bool(s.exact_langevin)
        for sampler in (self.trainer.sampler, self.chain_sampler):
            if sampler is not None:
                sampler.configure(s.step_size, s.noise, s.exact_langevin, s.clamp)
        self.settings = ToySettings(**asdict(s))

    def train(self, n: int = 1) -> int:
        """Run up to ``n`` guarded iterations; returns how many were attempted.

        Stops early, setting :attr:`diverged` to the guard's message, when the guard gives up
        (:class:`~jem_core.training.TrainingDiverged`); does nothing once diverged.
        """
        from .training import TrainingDiverged

        if self.diverged:
            return 0
        t0 = time.perf_counter()
        done = 0
        for _ in range(n):
            if not self._queue:
                self._queue.extend(self.trainer._batches())
                self.trainer.epoch += 1
            idx, lab = self._queue.popleft()
            done += 1
            try:
                s = self.trainer.guarded_step(idx, lab)
            except TrainingDiverged as e:
                self.diverged = str(e)
                break
            if s is not None:
                self.recent.append(s)
        self.seconds += time.perf_counter() - t0
        return done

    # -- live chains -----------------------------------------------------------------------------------
    def advance_chains(self, steps: int = 5) -> torch.Tensor:
        """Advance the display chains ``steps`` SGLD steps with the current settings; returns ``[n_chains, 2]``.

        Chains restart from ``U[-1, 1]^2`` every ``restart_every`` calls (and any non-finite or far-away
        chain at once); their last ``trail_length`` positions are in :attr:`trail`.
        """
        from .sampling import frozen_parameters, init_noise

        if self._chain_calls % self.restart_every == 0:
            self.chains = init_noise(self.n_chains, (2, 1, 1), self.chain_gen)
            self.trail.clear()
        self._chain_calls += 1
        model = self.trainer.model
        was = model.training
        model.eval()
        try:
            with frozen_parameters(model):
                self.chains = self.chain_sampler.run(self.chains, max(0, int(steps)))
        finally:
            model.train(was)
        bad = ~torch.isfinite(self.chains.flatten(1)).all(1) | (self.chains.flatten(1).abs() > 1e3).any(1)
        if bool(bad.any()):
            self.chains[bad] = init_noise(int(bad.sum()), (2, 1, 1), self.chain_gen)
        pts = self.chains.reshape(-1, 2).clone()
        self.trail.append(pts)
        return pts

    def buffer_points(self, n: int = 300) -> torch.Tensor | None:
        """``[min(n, size), 2]`` evenly spaced replay-buffer rows (None for the baseline, which has none)."""
        if self.trainer.buffer is None:
            return None
        return self.trainer.buffer.subset(n).reshape(-1, 2)

    # -- measurements ----------------------------------------------------------------------------------
    def measure(self, resolution: int = 96, ais: dict[str, Any] | None = None) -> tuple[dict[str, float], DensityGrid]:
        """Evaluate now and append to :attr:`history`; returns ``(row, grid)``.

        The row: ``iteration``, ``accuracy`` (test, in ``[0, 1]``), ``ece`` (15 bins, Guo et al. 2017),
        ``test_log_px`` (mean exact ``log p(x)`` of the test points, nats, normalised on the
        ``resolution``-grid), ``log_z`` and ``log_z_error`` (nats), ``gap`` (mean ``E(data) - E(samples)``
        over the last 25 iterations; NaN for the baseline), ``events`` (guard roll-backs so far), and with
        ``ais`` (keyword arguments of the AIS estimator, when :mod:`jem_core.likelihood` provides it)
        ``ais_log_z`` and ``ais_se`` (nats).
        """
        from .evaluation.calibration import calibration_report

        model = self.trainer.model
        grid = density_grid(model, resolution)
        test = self.trainer.test_set
        was = model.training
        model.eval()
        with torch.no_grad():
            logits = model(test.x).float()
        model.train(was)
        rep = calibration_report(torch.softmax(logits.double(), 1), test.y)
        e = energy_of_logits(logits).double()
        gaps = [r["px"] for r in self.recent if math.isfinite(r.get("px", math.nan))]
        row = {"iteration": float(self.iteration), "accuracy": rep.accuracy, "ece": rep.ece,
               "test_log_px": float((-e - grid.log_z).mean()), "log_z": grid.log_z, "log_z_error": grid.log_z_error,
               "gap": float(np.mean(gaps)) if gaps and self.objective == "jem" else math.nan,
               "events": float(len(self.events))}
        if ais is not None:
            est = ais_log_z(model, **ais)
            if est is not None:
                row["ais_log_z"], row["ais_se"] = est
        self.history.append(row)
        if len(self.history) > self.history_limit:
            self.history = self.history[:-1][::2] + [self.history[-1]]
        return row, grid

    # -- copies ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: weights, optimizer, buffer, counters, RNG states, chains."""
        t = self.trainer
        return {"model": {k: v.clone() for k, v in t.model.state_dict().items()},
                "optimizer": copy_state(t.optimizer.state_dict()),
                "buffer": None if t.buffer is None else t.buffer.buffer.clone(),
                "iteration": t.iteration, "epoch": t.epoch, "lr_scale": t.lr_scale, "retries": t.retries,
                "events": [dict(e) for e in t.events], "history": [dict(h) for h in self.history],
                "gen": t.gen.get_state(), "chain_gen": self.chain_gen.get_state(),
                "buffer_gen": None if t.buffer is None else t.buffer.generator.get_state(),
                "sampler_gen": None if t.sampler is None else t.sampler.generator.get_state(),
                "chains": self.chains.clone(), "settings": asdict(self.settings), "diverged": self.diverged,
                "seconds": self.seconds, "chain_calls": self._chain_calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output (from a trainer built with the same dataset and objective)."""
        t = self.trainer
        t.model.load_state_dict(state["model"])
        t.optimizer.load_state_dict(copy_state(state["optimizer"]))
        if t.buffer is not None and state["buffer"] is not None:
            t.buffer.buffer = state["buffer"].clone()
            t.buffer.generator.set_state(state["buffer_gen"])
        if t.sampler is not None and state["sampler_gen"] is not None:
            t.sampler.generator.set_state(state["sampler_gen"])
        t.iteration, t.epoch, t.lr_scale, t.retries = state["iteration"], state["epoch"], state["lr_scale"], state["retries"]
        t.events = [dict(e) for e in state["events"]]
        t.gen.set_state(state["gen"])
        self.chain_gen.set_state(state["chain_gen"])
        self.chains = state["chains"].clone()
        self.history = [dict(h) for h in state["history"]]
        self.diverged, self.seconds, self._chain_calls = state["diverged"], state["seconds"], state["chain_calls"]
        self.apply(ToySettings(**state["settings"]))
        self._queue.clear()
        self.trail.clear()
        t.take_snapshot()

    def clone(self) -> "ToyTrainer":
        """An independent copy (same data tensors, shared read-only) that continues exactly like this one."""
        out = ToyTrainer(self.dataset, self.objective, self.seed, self.settings,
                         buffer_size=self.trainer.cfg.buffer_size, batch_size=self.trainer.cfg.batch_size,
                         warmup_iters=self.trainer.cfg.warmup_iters, max_retries=self.trainer.cfg.max_retries,
                         n_chains=self.n_chains, trail_length=self.trail.maxlen or 10, restart_every=self.restart_every,
                         history_limit=self.history_limit, data=(self.trainer.train_set, self.trainer.test_set),
                         labels_per_class=self.trainer.cfg.labels_per_class)
        out.load_state_dict(self.state_dict())
        return out


def copy_state(obj: Any) -> Any:
    """A deep copy of nested dicts/lists of tensors (optimizer state dicts), tensors cloned."""
    if torch.is_tensor(obj):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: copy_state(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [copy_state(v) for v in obj]
    return obj


def ais_log_z(model: nn.Module, n_temps: int = 200, n_chains: int = 64, seed: int = 0, **kwargs: Any
              ) -> tuple[float, float] | None:
    """``(log Z, standard error)`` in nats of a 2-D model on the box by annealed importance sampling
    (Neal 2001; :func:`jem_core.likelihood.ais`, HMC with reflection at the box walls, uniform start),
    for comparison with :func:`log_z_quadrature`; None when :mod:`jem_core.likelihood` is not installed.

    Args:
        model: ``[N, 2, 1, 1] -> logits [N, K]``; its parameters are not changed.
        n_temps: annealing temperatures; n_chains: AIS chains (>= 2); seed: the run's seed.
        kwargs: more options of :func:`jem_core.likelihood.ais` (``sampler``, ``schedule``, ...).

    The standard error is a bootstrap over chains; ``log Ẑ`` under-estimates ``log Z`` in expectation
    (Jensen), by little when the effective sample size is large.
    """
    try:
        from .likelihood import ais, model_energy_fn
    except ImportError:
        return None
    from .sampling import frozen_parameters

    was = model.training
    model.eval()
    try:
        with frozen_parameters(model):
            r = ais(model_energy_fn(model), (2, 1, 1), n_temps=n_temps, n_chains=n_chains, seed=seed, **kwargs)
    finally:
        model.train(was)
    return float(r.log_z), float(r.log_z_se)


def pretrained_pair(dataset: str = "toy:moons", seed: int = 0, iterations: int = 400, measure_every: int = 25,
                    settings: ToySettings | None = None, **kwargs: Any) -> tuple[ToyTrainer, ToyTrainer]:
    """A JEM and a baseline trained ``iterations`` steps on the same data with the same seed, with a measured
    history (every ``measure_every`` iterations); the starting point of the 2-D playground.

    Takes a few seconds on one CPU core (400 iterations of 20 SGLD steps for the JEM).
    ``kwargs`` go to :class:`ToyTrainer`.
    """
    train, test = load_toy(dataset, "train"), load_toy(dataset, "test")
    out = []
    for objective in ("jem", "baseline"):
        t = ToyTrainer(dataset, objective, seed, settings, data=(train, test), **kwargs)
        t.measure()
        while t.iteration < iterations and not t.diverged:
            t.train(measure_every)
            t.measure()
        out.append(t)
    return out[0], out[1]


def save_points_png(points: torch.Tensor, path: str | Path, size: int = 400) -> None:
    """Write points as a scatter plot over the box (matplotlib): a ``size x size`` PNG with the box's frame
    and the axes through 0; points outside the box are not drawn.

    Args:
        points: ``[N, 2]`` or ``[N, 2, 1, 1]`` in box units.
        path: the PNG file (parent folders are created).
        size: image side in pixels (>= 50).

    Raises:
        ValueError: bad shape or size.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if size < 50:
        raise ValueError(f"size must be >= 50 pixels; got {size}")
    p = points_of(points).detach().double().cpu().numpy()
    inside = (p >= BOX[0]).all(1) & (p <= BOX[1]).all(1)
    dpi = 100
    fig, ax = plt.subplots(figsize=(size / dpi, size / dpi), dpi=dpi)
    ax.scatter(p[inside, 0], p[inside, 1], s=4, color="#1f77b4", linewidths=0)
    ax.axhline(0, color="#dddddd", lw=0.8, zorder=0)
    ax.axvline(0, color="#dddddd", lw=0.8, zorder=0)
    ax.set_xlim(*BOX)
    ax.set_ylim(*BOX)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.subplots_adjust(0, 0, 1, 1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)
    plt.close(fig)
