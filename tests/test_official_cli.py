"""``python -m jem_core import-official``: an official JEM checkpoint (random weights, official key
layout) converts once into our format and loads with the same logits; bad files are argparse-style errors."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from jem_core.checkpoint import CheckpointError, load_checkpoint
from jem_core.cli import main
from jem_core.official import CIFAR10_CLASSES
from jem_core.wideresnet import WideResNet

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # the offline data root


def _official(depth: int = 10, width: int = 1, norm: str | None = None, seed: int = 0) -> WideResNet:
    """A model with the official F/CCF key layout (checked against the official structure in test_wideresnet)."""
    torch.manual_seed(seed)
    m = WideResNet(depth=depth, widen_factor=width, norm=norm).eval()
    if norm == "batch":  # non-trivial running statistics, so that loading them matters
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return m


def _run(capsys, *args):
    code = main(["import-official", *map(str, args)])
    return code, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_official_checkpoint_converts_once_with_buffer_and_reference(tmp_path, capsys):
    src = _official()
    buffer = torch.rand(1000, 3, 32, 32) * 2.2 - 1.1  # the official SGLD does not clamp
    torch.save({"model_state_dict": src.state_dict(), "replay_buffer": buffer}, tmp_path / "official.pt")
    args = [tmp_path / "official.pt", "--out", tmp_path / "ours.pt", "--keep-buffer", "50", "--n-reference", "100"]
    if (SHARED_DATA / "cifar10_test_1000.npz").is_file():
        args += ["--data-root", SHARED_DATA]
    with pytest.warns(UserWarning, match="outside"):
        code, summary = _run(capsys, *args)
    assert code == 0 and summary["arch"] == "WRN-10-1" and summary["buffer_rows"] == 1000
    ck = load_checkpoint(tmp_path / "ours.pt")
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(ck.model(x), src(x), rtol=0, atol=0)
    m = ck.metadata
    assert m["arch"] == "wrn" and m["arch_kwargs"]["depth"] == 10 and m["arch_kwargs"]["norm"] is None
    assert m["dataset"] == "cifar10" and m["class_names"] == list(CIFAR10_CLASSES)
    assert ck.replay_buffer.shape == (50, 3, 32, 32) and ck.replay_buffer.abs().max() <= 1
    assert m["import"]["replay_buffer_rows"] == 1000
    if "--data-root" in args:
        assert len(m["reference"]["logpx_quantiles"]) == 101 and m["reference"]["n"] == 100
        assert m["reference"]["split"].startswith("cifar10 test")
    else:
        assert "reference" not in m and "reference_note" in m


def test_bare_state_dict_with_batch_norm_converts(tmp_path, capsys):
    src = _official(norm="batch", seed=1)
    torch.save(src.state_dict(), tmp_path / "bare.pt")
    code, summary = _run(capsys, tmp_path / "bare.pt", "--out", tmp_path / "ours.pt", "--data-root", tmp_path)
    assert code == 0 and summary["norm"] == "batch" and summary["buffer_kept"] == 0
    assert "no cifar10 test split" in summary["note"]  # no test set there: reference left out, said so
    ck = load_checkpoint(tmp_path / "ours.pt")
    assert ck.metadata["arch_kwargs"]["norm"] == "batch" and ck.replay_buffer is None
    assert "reference" not in ck.metadata and ck.metadata["reference_note"] == summary["note"]
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(ck.model(x), src(x), rtol=0, atol=0)  # eval mode: the running statistics


def test_official_file_given_to_our_loader_points_at_the_importer(tmp_path):
    torch.save({"model_state_dict": _official().state_dict(), "replay_buffer": []}, tmp_path / "official.pt")
    with pytest.raises(CheckpointError, match="import-official"):
        load_checkpoint(tmp_path / "official.pt")


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def _mismatched(tmp_path):
    sd = _official().state_dict()
    sd.pop("f.layer2.0.conv1.weight")
    sd["f.extra.weight"] = torch.zeros(3)
    torch.save({"model_state_dict": sd}, tmp_path / "in.pt")
    return ["f.layer2.0.conv1.weight", "f.extra.weight"]


def _pickled_code(tmp_path):
    with open(tmp_path / "in.pt", "wb") as f:
        pickle.dump({"model_state_dict": _Evil()}, f, protocol=2)
    return ["weights_only"]


def _same_file(tmp_path):
    torch.save(_official().state_dict(), tmp_path / "in.pt")
    return ["is the input file"]


def _wrong_dataset(tmp_path):
    torch.save(_official().state_dict(), tmp_path / "in.pt")
    return ["has 100 classes"]


@pytest.mark.parametrize("make, extra", [(_mismatched, []), (_pickled_code, []), (_same_file, ["same"]),
                                         (_wrong_dataset, ["--dataset", "cifar100"])])
def test_bad_input_is_an_argparse_error_naming_the_problem(tmp_path, capsys, make, extra):
    expected = make(tmp_path)
    out = tmp_path / ("in.pt" if extra == ["same"] else "out.pt")
    with pytest.raises(SystemExit) as e:
        main(["import-official", str(tmp_path / "in.pt"), "--out", str(out), *[a for a in extra if a != "same"]])
    captured = capsys.readouterr()
    assert e.value.code == 2 and "import-official: error:" in captured.err
    assert all(s in captured.err for s in expected), captured.err
    assert "this must never run" not in captured.out
    assert extra == ["same"] or not out.exists()
