"""Dataset specs and the bundled demo pack: a fresh offline machine gets MNIST's and Fashion-MNIST's test
images from the pack, never their training split, and a download that cannot reach a mirror says where
the files go."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from jem_core import data
from jem_core.data import DataUnavailableError, data_available, download_dataset, load_dataset


def test_the_demo_pack_serves_the_whole_mnist_test_split_when_the_data_root_is_empty(tmp_path):
    assert data_available("mnist", tmp_path, "test") and not data_available("mnist", tmp_path, "train")
    test = load_dataset("mnist", "test", tmp_path, download=False)
    assert test.x.shape == (10_000, 1, 28, 28) and test.x.dtype == torch.float32
    assert test.x.min() == -1 and test.x.max() == 1
    assert test.y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the official first test labels
    assert torch.equal(torch.bincount(test.y), torch.tensor([980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]))
    assert "demo pack" in test.note and test.class_names[0] == "0 - zero"
    fashion = load_dataset("fashion_mnist", "test", tmp_path, download=False)
    assert fashion.x.shape == (2000, 1, 28, 28) and fashion.y[:5].tolist() == [9, 2, 1, 1, 6]
    assert fashion.class_names[9] == "Ankle boot"
    with pytest.raises(DataUnavailableError, match="MNIST/raw"):
        load_dataset("mnist", "train", tmp_path, download=False)


def test_a_data_root_with_mnist_wins_over_the_pack_and_gives_the_same_images(data_root):
    root = load_dataset("mnist", "test", data_root, download=False)
    assert root.note == "" and "demo pack" not in root.note
    pack = load_dataset("mnist", "test", data_root.parent / "no_such_root", download=False)
    assert torch.equal(root.x, pack.x) and torch.equal(root.y, pack.y)  # the same bytes, bit for bit


def test_without_the_pack_nothing_pretends_to_be_there(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DEMO_PACK_DIR", tmp_path / "missing")
    assert not data_available("mnist", tmp_path, "test")
    with pytest.raises(DataUnavailableError, match="Put the files at"):
        load_dataset("mnist", "test", tmp_path, download=False)


def test_pack_files_are_uint8_images_with_int64_labels_and_a_licence_note():
    for f, n in [("mnist_test.npz", 10_000), ("fashion_mnist_test_2000.npz", 2000)]:
        with np.load(data.DEMO_PACK_DIR / f) as z:
            assert z["x"].dtype == np.uint8 and z["x"].shape == (n, 28, 28) and z["y"].dtype == np.int64
    readme = (data.DEMO_PACK_DIR / "README.md").read_text()
    assert "CC BY-SA 3.0" in readme and "MIT" in readme and "Zalando" in readme and "LeCun" in readme


def test_download_without_a_reachable_mirror_says_where_the_files_go(tmp_path, monkeypatch):
    from torchvision import datasets

    monkeypatch.setattr(datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])  # nothing listens on port 9
    with pytest.raises(DataUnavailableError, match=r"MNIST/raw/\{train,t10k\}"):
        download_dataset("mnist", tmp_path)
    with pytest.raises(ValueError, match="mnist and fashion_mnist"):
        download_dataset("cifar10", tmp_path)
