"""WideResNet (official JEM key layout) and the official-checkpoint importer.

``_OfficialF`` below re-states the structure of the official JEM model (``F`` in
``train_wrn_ebm.py`` around ``Wide_ResNet`` in ``wideresnet.py``, github.com/wgrathwohl/JEM)
independently of ``jem_core.wideresnet``, so the key names, shapes and outputs of our class
are checked against a second implementation rather than against themselves.
"""

from __future__ import annotations

import os
import shlex

import pytest
import torch
import torch.nn.functional as tnf
from torch import nn

from jem_core.checkpoint import CheckpointError, safe_torch_load
from jem_core.official import (
    build_from_official,
    infer_wrn_config,
    load_official_state_dict,
    official_metadata,
    validate_replay_buffer,
)
from jem_core.wideresnet import WideResNet


# --------------------------------------------------------------------------- official layout
def _official_norm(c: int, norm: str | None) -> nn.Module:
    if norm is None:
        return nn.Identity()
    if norm == "batch":
        return nn.BatchNorm2d(c, momentum=0.9)
    if norm == "instance":
        return nn.InstanceNorm2d(c, affine=True)
    raise NotImplementedError(norm)


class _OfficialBlock(nn.Module):  # official ``wide_basic``
    def __init__(self, cin, cout, stride, norm):
        super().__init__()
        self.lrelu = nn.LeakyReLU(0.2)
        self.bn1 = _official_norm(cin, norm)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=True)
        self.dropout = nn.Identity()
        self.bn2 = _official_norm(cout, norm)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=stride, padding=1, bias=True)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=True))

    def forward(self, x):
        out = self.dropout(self.conv1(self.lrelu(self.bn1(x))))
        out = self.conv2(self.lrelu(self.bn2(out)))
        out += self.shortcut(x)
        return out


class _OfficialTrunk(nn.Module):  # official ``Wide_ResNet`` (num_classes left at its default 10)
    def __init__(self, depth, k, norm, num_classes=10, input_channels=3):
        super().__init__()
        n = (depth - 4) // 6
        self.lrelu = nn.LeakyReLU(0.2)
        self.conv1 = nn.Conv2d(input_channels, 16, 3, stride=1, padding=1, bias=True)
        self.in_planes = 16

        def stage(planes, stride):
            mods = []
            for s in [stride] + [1] * (n - 1):
                mods.append(_OfficialBlock(self.in_planes, planes, s, norm))
                self.in_planes = planes
            return nn.Sequential(*mods)

        self.layer1, self.layer2, self.layer3 = stage(16 * k, 1), stage(32 * k, 2), stage(64 * k, 2)
        self.bn1 = _official_norm(64 * k, norm)
        self.last_dim = 64 * k
        self.linear = nn.Linear(64 * k, num_classes)

    def forward(self, x):
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        out = self.lrelu(self.bn1(out))
        out = tnf.avg_pool2d(out, 8)
        return out.view(out.size(0), -1)


class _OfficialF(nn.Module):  # official ``F``: note n_classes is NOT passed to the trunk
    def __init__(self, depth=28, width=2, norm=None, n_classes=10):
        super().__init__()
        self.f = _OfficialTrunk(depth, width, norm)
        self.energy_output = nn.Linear(self.f.last_dim, 1)
        self.class_output = nn.Linear(self.f.last_dim, n_classes)

    def classify(self, x):
        return self.class_output(self.f(x)).squeeze()


def _official_state_dict(depth=28, width=2, norm=None, n_classes=10, seed=0):
    """A state dict with the official key layout and random (non-default) values everywhere."""
    torch.manual_seed(seed)
    off = _OfficialF(depth, width, norm, n_classes)
    with torch.no_grad():
        for name, t in off.state_dict().items():
            if name.endswith("running_var"):
                t.uniform_(0.5, 2.0)
            elif name.endswith("num_batches_tracked"):
                t.fill_(123)
            elif t.is_floating_point():
                t.normal_(0.0, 0.05 if t.dim() > 1 else 0.2)
    return off.eval(), off.state_dict()


def _shapes(sd):
    return {k: tuple(v.shape) for k, v in sd.items()}


# --------------------------------------------------------------------------- architecture
def test_28_2_loaded_from_official_gives_identical_logits():
    off, sd = _official_state_dict(28, 2)
    model, cfg, buf = build_from_official(sd)
    assert buf is None
    assert cfg == {"depth": 28, "widen_factor": 2, "n_classes": 10, "in_channels": 3, "norm": None,
                   "trunk_linear_out": 10}
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        ours, theirs = model(x), off.classify(x)
    assert ours.shape == (2, 10) and ours.dtype == torch.float32
    assert theirs.abs().max() > 1e-2  # non-trivial logits
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model.features(x), off.f(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("norm", ["batch", "instance"])
def test_normalised_variants_give_identical_logits(norm):
    off, sd = _official_state_dict(16, 2, norm=norm, n_classes=100, seed=3)
    model, cfg, _ = build_from_official({"model_state_dict": sd, "replay_buffer": []})
    assert cfg["norm"] == norm and cfg["n_classes"] == 100 and cfg["depth"] == 16
    assert not model.training
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model(x), off.classify(x), rtol=0, atol=1e-5)
    if norm == "batch":  # running statistics were loaded, not left at their defaults
        assert model.f.bn1.num_batches_tracked.item() == 123
        assert torch.equal(model.f.layer2[1].bn2.running_var, sd["f.layer2.1.bn2.running_var"])


@pytest.mark.parametrize("depth,width,norm,n_classes", [
    (28, 10, None, 10), (28, 2, None, 10), (16, 4, None, 10), (28, 10, "batch", 100), (22, 1, "instance", 10),
])
def test_key_names_and_shapes_equal_official(depth, width, norm, n_classes):
    with torch.device("meta"):  # no memory, no init cost, even for WRN-28-10 (36M parameters)
        ours = WideResNet(depth, width, n_classes=n_classes, norm=norm)
        theirs = _OfficialF(depth, width, norm, n_classes)
    assert list(ours.state_dict()) == list(theirs.state_dict())  # same names, same order
    assert _shapes(ours.state_dict()) == _shapes(theirs.state_dict())
    assert theirs.state_dict()["f.linear.weight"].shape == (10, 64 * width)  # official quirk kept


def test_wrn_28_10_size_and_feature_dims():
    with torch.device("meta"):
        model = WideResNet(28, 10)
        x = torch.empty(2, 3, 32, 32)
        feats, logits = model.features(x), model(x)
    n_params = sum(p.numel() for p in model.parameters())
    assert 36.0e6 < n_params < 36.6e6, n_params  # WRN-28-10 is ~36.5M incl. the unused heads
    assert model.last_dim == 640 and feats.shape == (2, 640) and logits.shape == (2, 10)


@pytest.mark.parametrize("depth,width", [(16, 2), (10, 3)])
def test_features_have_64k_dims_and_head_maps_them(depth, width):
    torch.manual_seed(0)
    model = WideResNet(depth, width, n_classes=7).eval()
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        feats = model.features(x)
        logits = model(x)
    assert feats.shape == (3, 64 * width) and feats.dtype == torch.float32
    assert logits.shape == (3, 7)
    torch.testing.assert_close(logits, model.class_output(feats))
    single = model(x[:1])  # never squeezed, unlike the official classify
    assert single.shape == (1, 7)
    torch.testing.assert_close(single, logits[:1], rtol=1e-4, atol=1e-5)  # batch 1 vs 3: other kernels, tolerance


@pytest.mark.parametrize("depth", [27, 8, 4, 29])
def test_bad_depth_raises_clear_error(depth):
    with pytest.raises(ValueError, match=r"6n \+ 4"):
        WideResNet(depth=depth)


def test_unsupported_norm_raises():
    with pytest.raises(ValueError, match="ActNorm"):
        WideResNet(16, 1, norm="act")
    with pytest.raises(ValueError, match="unknown norm"):
        WideResNet(16, 1, norm="spectral")


# --------------------------------------------------------------------------- config inference
@pytest.mark.parametrize("depth,width,norm,n_classes", [
    (28, 2, None, 10), (28, 10, None, 10), (16, 4, None, 10), (28, 2, "batch", 10), (28, 10, None, 100),
    (22, 1, "instance", 10),
])
def test_infer_wrn_config(depth, width, norm, n_classes):
    with torch.device("meta"):
        sd = _OfficialF(depth, width, norm, n_classes).state_dict()
    cfg = infer_wrn_config(sd)
    assert cfg == {"depth": depth, "widen_factor": width, "n_classes": n_classes, "in_channels": 3,
                   "norm": norm, "trunk_linear_out": 10}
    assert infer_wrn_config({"module." + k: v for k, v in sd.items()}) == cfg


def test_infer_rejects_other_models():
    with pytest.raises(CheckpointError, match="missing"):
        infer_wrn_config(nn.Linear(3, 2).state_dict())
    with torch.device("meta"):
        sd = _OfficialF(16, 1).state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith("f.layer3.1.")}  # layer3 one block short
    with pytest.raises(CheckpointError, match="same number of blocks"):
        infer_wrn_config(sd)


# --------------------------------------------------------------------------- unwrapping & loading
def test_wrapped_checkpoint_file_with_module_prefix_and_buffer(tmp_path):
    off, sd = _official_state_dict(16, 1, seed=5)
    buffer = torch.rand(20, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    path = tmp_path / "ckpt.pt"
    torch.save({"model_state_dict": {"module." + k: v for k, v in sd.items()}, "replay_buffer": buffer}, path)
    model, cfg, buf = build_from_official(safe_torch_load(path))
    assert buf.shape == (20, 3, 32, 32) and buf.dtype == torch.float32
    assert torch.equal(buf, buffer)
    x = buffer[:2]
    with torch.no_grad():
        torch.testing.assert_close(model(x), off.classify(x), rtol=0, atol=1e-5)
    # a path works directly too, and a bare state dict gives no buffer
    assert build_from_official(path)[2].shape == (20, 3, 32, 32)
    bare = tmp_path / "bare.pt"
    torch.save(sd, bare)
    sd2, raw = load_official_state_dict(safe_torch_load(bare))
    assert raw is None and list(sd2) == list(sd)
    assert build_from_official(bare)[2] is None


def test_legacy_non_zip_format_loads(tmp_path):
    """JEM (2019) predates PyTorch 1.6's zip format; such files must still load weights-only."""
    _, sd = _official_state_dict(10, 1, seed=6)
    path = tmp_path / "legacy.pt"
    torch.save({"model_state_dict": sd, "replay_buffer": torch.zeros(4, 3, 32, 32)}, path,
               _use_new_zipfile_serialization=False)
    model, cfg, buf = build_from_official(safe_torch_load(path))
    assert cfg["depth"] == 10 and buf.shape == (4, 3, 32, 32)
    assert torch.equal(model.state_dict()["class_output.weight"], sd["class_output.weight"])


def test_replay_buffer_validation():
    b64 = torch.linspace(-1.5, 1.5, 2 * 3 * 32 * 32, dtype=torch.float64).reshape(2, 3, 32, 32)
    with pytest.warns(UserWarning, match="clamped"):
        out = validate_replay_buffer(b64)
    assert out.dtype == torch.float32 and out.min() == -1 and out.max() == 1
    assert validate_replay_buffer(None) is None and validate_replay_buffer([]) is None
    assert validate_replay_buffer(torch.zeros(0, 3, 32, 32)) is None
    for bad, msg in [(torch.zeros(5, 3, 28, 28), "shape"), (torch.zeros(5, 1, 32, 32), "shape"),
                     (torch.zeros(5, 3, 32, 32, dtype=torch.uint8), "floating"), ("noise", "tensor"),
                     (torch.full((2, 3, 32, 32), float("nan")), "NaN")]:
        with pytest.raises(CheckpointError, match=msg):
            validate_replay_buffer(bad)
    _, sd = _official_state_dict(10, 1)
    with pytest.raises(CheckpointError, match="replay_buffer"):
        build_from_official({"model_state_dict": sd, "replay_buffer": torch.zeros(3, 3, 16, 16)})


@pytest.mark.parametrize("obj", [[1, 2], {"state": 1}, {}, "x", {"model_state_dict": {"a": 1}}])
def test_unrecognised_objects_raise(obj):
    with pytest.raises(CheckpointError, match="state dict|official JEM"):
        load_official_state_dict(obj)


def _mutations():
    _, sd = _official_state_dict(10, 1, norm="batch")
    removed = dict(sd)
    del removed["f.layer2.0.conv2.bias"]
    extra = dict(sd, **{"f.layer3.0.extra.weight": torch.zeros(3)})
    wrong = dict(sd, **{"f.layer2.0.conv1.weight": torch.zeros(32, 16, 5, 5)})
    return [("missing keys: f.layer2.0.conv2.bias", removed),
            ("unexpected keys: f.layer3.0.extra.weight", extra),
            (r"shape mismatches: f.layer2.0.conv1.weight \(checkpoint \[32, 16, 5, 5\], model \[32, 16, 3, 3\]\)", wrong)]


@pytest.mark.parametrize("pattern,sd", _mutations(), ids=["missing", "unexpected", "shape"])
def test_mismatched_state_dict_names_the_key(pattern, sd):
    with pytest.raises(CheckpointError, match=pattern):
        build_from_official(sd)
    with pytest.raises(CheckpointError, match=pattern):  # also through the wrapped form
        build_from_official({"model_state_dict": sd, "replay_buffer": torch.zeros(2, 3, 32, 32)})


def test_nonfinite_weights_rejected():
    _, sd = _official_state_dict(10, 1)
    sd = dict(sd)
    sd["f.layer1.0.conv1.weight"] = sd["f.layer1.0.conv1.weight"].clone()
    sd["f.layer1.0.conv1.weight"][0, 0, 0, 0] = float("inf")
    with pytest.raises(CheckpointError, match="f.layer1.0.conv1.weight"):
        build_from_official(sd)


def test_missing_num_batches_tracked_is_tolerated():
    off, sd = _official_state_dict(10, 1, norm="batch")
    old = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    model, cfg, _ = build_from_official(old)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model(x), off.classify(x), rtol=0, atol=1e-5)


def test_norm_override_layer_and_conflict():
    _, sd = _official_state_dict(10, 1, norm="instance")
    model, cfg, _ = build_from_official(sd, norm="layer")
    assert cfg["norm"] == "layer" and isinstance(model.f.bn1, nn.GroupNorm)
    with pytest.raises(CheckpointError, match="norm="):
        build_from_official(sd, norm="batch")


# --------------------------------------------------------------------------- safety
class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, ("touch " + shlex.quote(str(self.marker)),))


def test_read_official_never_runs_pickled_code(tmp_path):
    marker = tmp_path / "MARKER"
    path = tmp_path / "evil.pt"
    _, sd = _official_state_dict(10, 1)
    torch.save({"model_state_dict": sd, "replay_buffer": _Exploit(marker)}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pt.*weights_only"):
        safe_torch_load(path)
    with pytest.raises(CheckpointError) as info:
        build_from_official(path)
    assert "weights_only=False" not in str(info.value)  # no advice to disable the protection
    assert not marker.exists()
    # control: the payload is live, i.e. the test above is meaningful
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_read_official_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CheckpointError, match="nope.pt"):
        safe_torch_load(tmp_path / "nope.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="junk.pt"):
        safe_torch_load(junk)


def test_both_loaders_read_files_through_one_safe_load(tmp_path):
    """Our loader and the official importer refuse a bad file with the same error class and message."""
    from jem_core.checkpoint import load_checkpoint

    png = tmp_path / "picture.pt"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(CheckpointError) as ours:
        load_checkpoint(png)
    with pytest.raises(CheckpointError) as official:
        build_from_official(png)
    assert str(ours.value) == str(official.value) and "a PNG image" in str(ours.value)


def test_official_import_is_a_key_map_onto_the_normal_loader(monkeypatch):
    import jem_core.official as official

    seen = []
    real = official.checkpoint_from_dict
    monkeypatch.setattr(official, "checkpoint_from_dict", lambda obj, *a, **k: (seen.append(obj), real(obj, *a, **k))[1])
    off, sd = _official_state_dict(10, 1, norm="batch")
    model, cfg, _ = build_from_official({"module." + k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")})
    assert len(seen) == 1 and seen[0]["metadata"] == official_metadata(cfg, "(in memory)")
    assert set(seen[0]["state_dict"]) == set(sd)  # prefix dropped, num_batches_tracked filled in
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model(x), off.classify(x), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- metadata
def test_official_metadata_rebuilds_the_model():
    cfg = {"depth": 28, "widen_factor": 10, "n_classes": 100, "in_channels": 3, "norm": None, "trunk_linear_out": 10}
    meta = official_metadata(cfg, "/ckpts/CIFAR100.pt")
    assert meta == {
        "arch": "wrn", "arch_kwargs": {"depth": 28, "widen_factor": 10, "norm": None, "dropout": 0.0},
        "in_channels": 3, "image_size": 32, "n_classes": 100, "dataset": "cifar100",
        "normalization": "[-1, 1]", "objective": "jem", "source": "official JEM checkpoint /ckpts/CIFAR100.pt",
        "train_args": {}, "metrics": {},
    }
    assert official_metadata(dict(cfg, n_classes=10), "a.pt")["dataset"] == "cifar10"
    assert official_metadata(dict(cfg, n_classes=7), "a.pt")["dataset"] == "unknown"
    with torch.device("meta"):
        rebuilt = WideResNet(in_channels=meta["in_channels"], n_classes=meta["n_classes"], **meta["arch_kwargs"])
        ref = _OfficialF(28, 10, None, 100)
    assert _shapes(rebuilt.state_dict()) == _shapes(ref.state_dict())
