"""The CIFAR path on these CPUs: a smoke train and evaluate of a tiny WideResNet on the reduced
CIFAR-10 test file (../shared/data/cifar10_test_1000.npz), the augmentation defaults, and a clear
error when the CIFAR-10 train split is absent."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

from jem_core.checkpoint import load_checkpoint
from jem_core.cli import main
from jem_core.data import load_dataset
from jem_core.training import TrainConfig, Trainer

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # the offline data root

CIFAR_NPZ = SHARED_DATA / "cifar10_test_1000.npz"
needs_cifar = pytest.mark.skipif(not CIFAR_NPZ.is_file(), reason=f"{CIFAR_NPZ} not present")
TINY_WRN = ["--arch", "wrn", "--depth", "10", "--widen-factor", "1"]  # depth 6n + 4 with n = 1


@pytest.fixture(scope="module")
def cifar_ckpt(tmp_path_factory):
    """A WRN-10-1 JEM trained for 2 iterations on the 800 training images of the reduced file, via the CLI."""
    out = tmp_path_factory.mktemp("cifar") / "wrn.pt"
    code = main(["train", "--dataset", f"npz:{CIFAR_NPZ}", *TINY_WRN, "--epochs", "1", "--max-iters-per-epoch", "2",
                 "--sgld-steps", "2", "--batch-size", "8", "--buffer-size", "100", "--keep-buffer", "20",
                 "--n-reference", "50", "--out", str(out), "--quiet"])
    assert code == 0
    return out


@needs_cifar
def test_cifar_smoke_train_writes_a_wideresnet_checkpoint(cifar_ckpt):
    ck = load_checkpoint(cifar_ckpt)
    m = ck.metadata
    assert m["arch"] == "wrn" and m["arch_kwargs"]["depth"] == 10 and m["arch_kwargs"]["widen_factor"] == 1
    assert (m["in_channels"], m["image_size"], m["n_classes"]) == (3, 32, 10)
    assert m["metrics"]["iterations"] == 2 and len(m["reference"]["logpx_quantiles"]) == 101
    assert ck.replay_buffer.shape == (20, 3, 32, 32) and ck.replay_buffer.abs().max() <= 1
    assert ck.model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)


@needs_cifar
def test_cifar_smoke_evaluate_writes_a_report(cifar_ckpt, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["evaluate", "--checkpoint", str(cifar_ckpt), "--data-root", str(SHARED_DATA), "--ood", "uniform",
                 "interp", "--n-test", "100", "--n-calib", "20", "--n-ood", "50", "--n-attack", "4",
                 "--attack-steps", "1", "--eps", "0", "0.03", "--eps-l2", "0.5", "--eps-fgsm", "--refine-steps", "0",
                 "--skip", "samples", "--quiet", "--out", str(out)])
    assert code == 0
    r = json.loads((out / "report.json").read_text())
    assert r["n_test"] == 100 and 0 <= r["accuracy"] <= 1 and 0 <= r["ece"] <= 1
    assert set(r["ood"]) == {"uniform", "interp"}
    aurocs = [v["auroc"] for scores in r["ood"].values() for v in scores.values()]
    assert aurocs and all(0 <= a <= 1 for a in aurocs)
    assert (out / "report.md").is_file()


@needs_cifar
@pytest.mark.parametrize("dataset, flip", [("cifar10", True), ("cifar100", True), ("svhn", False), ("npz:x.npz", False)])
def test_augmentation_defaults_follow_jem(dataset, flip):
    """4-pixel pad-crop on 32x32 data; flips for CIFAR only (SVHN digits are not mirror-symmetric)."""
    ds = load_dataset(f"npz:{CIFAR_NPZ}", "test").subset(16)
    cfg = TrainConfig(dataset=dataset, arch="wrn", depth=10, widen_factor=1, buffer_size=10, epochs=1)
    t = Trainer(cfg, train_set=ds, test_set=ds)
    assert (t.crop, t.flip, t.cfg.data_noise) == (4, flip, 0.03)
    assert Trainer(TrainConfig(dataset=dataset, arch="wrn", depth=10, widen_factor=1, buffer_size=10, flip=not flip),
                   train_set=ds, test_set=ds).flip is not flip  # --flip / --no-flip override


@needs_cifar
def test_cifar10_without_its_train_split_is_a_clear_error(monkeypatch, capsys):
    """../shared/data holds only the reduced CIFAR-10 test file: training must say where the train split goes."""
    import jem_core.training as training

    # Never try to download here (the CI machine may be online; this machine is not).
    monkeypatch.setattr(training, "load_dataset", functools.partial(load_dataset, download=False))
    with pytest.raises(SystemExit) as e:
        main(["train", "--dataset", "cifar10", "--data-root", str(SHARED_DATA), *TINY_WRN, "--out", "unused.pt"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "cifar-10-batches-py" in err and "--data-root" in err
