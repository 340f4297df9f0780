"""Checkpoints round-trip, are written atomically, and refuse corrupt or unsafe files."""

import os
import pickle

import pytest
import torch

from jem_core.checkpoint import CheckpointError, atomic_torch_save, load_checkpoint, save_checkpoint
from jem_core.energy import JEM
from jem_core.models import ConvNet

META = {"arch": "convnet", "arch_kwargs": {"width": 8, "image_size": 8}, "in_channels": 1, "image_size": 8, "n_classes": 10,
        "dataset": "digits", "objective": "jem"}


def _saved(tmp_path, buf=None):
    model = ConvNet(1, 10, width=8, image_size=8)
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, META, replay_buffer=buf)
    return model, path


def test_round_trip_gives_same_outputs_metadata_and_buffer(tmp_path):
    buf = torch.rand(12, 1, 8, 8) * 2 - 1
    model, path = _saved(tmp_path, buf)
    ck = load_checkpoint(path)
    x = torch.rand(3, 1, 8, 8) * 2 - 1
    assert torch.equal(ck.model(x), model(x))
    assert not ck.model.training
    assert ck.metadata["dataset"] == "digits" and ck.metadata["version"]
    assert torch.equal(ck.replay_buffer, buf)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")], "no temp file left behind"


def test_truncated_and_garbage_files_are_refused(tmp_path):
    _, path = _saved(tmp_path)
    data = path.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.pt").write_text("hello")
    for name in ("trunc.pt", "text.pt"):
        with pytest.raises(CheckpointError, match="not a readable checkpoint"):
            load_checkpoint(tmp_path / name)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_wrong_architecture_names_the_mismatch(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, ConvNet(1, 10, width=8, image_size=8), META)
    obj = torch.load(path, weights_only=True)
    obj["metadata"]["n_classes"] = 5
    torch.save(obj, tmp_path / "k5.pt")
    with pytest.raises(CheckpointError, match=r"shape mismatches.*head\.weight"):
        load_checkpoint(tmp_path / "k5.pt")
    del obj["state_dict"]["head.bias"]
    obj["metadata"]["n_classes"] = 10
    torch.save(obj, tmp_path / "missing_key.pt")
    with pytest.raises(CheckpointError, match=r"missing keys: head\.bias"):
        load_checkpoint(tmp_path / "missing_key.pt")


def test_not_a_checkpoint_and_state_dict_only(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a JEM Explorer checkpoint"):
        load_checkpoint(tmp_path / "other.pt")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickle_is_refused_and_does_not_run(tmp_path):
    marker = tmp_path / "PWNED"
    torch.save({"state_dict": {}, "metadata": META, "payload": _Evil(marker)}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    with open(tmp_path / "evil.pkl", "wb") as f:  # a plain pickle, not torch's zip format
        pickle.dump(_Evil(marker), f)
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "evil.pkl")
    assert not marker.exists()


def test_atomic_save_keeps_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "a.pt"
    atomic_torch_save({"v": torch.tensor(1)}, path)

    class Boom:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_torch_save({"v": Boom()}, path)
    assert torch.load(path, weights_only=True)["v"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]


def test_loading_from_bytes_matches_loading_from_path(tmp_path):
    _, path = _saved(tmp_path)
    a, b = load_checkpoint(path), load_checkpoint(path.read_bytes())
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(a.model(x), b.model(x)) and isinstance(b.model, JEM)
