"""Reliability and security: bad uploads, untrusted checkpoints, divergence, interrupted
training, bad arguments, the app under load.

Each test asserts the right behaviour for one case of docs/RELIABILITY.md; cases already covered
elsewhere (tests/test_images.py, test_checkpoint.py, test_training.py, test_cli.py,
test_evaluation.py, test_wideresnet.py) are referenced there, not repeated here. Subprocesses run with
one torch thread (OMP_NUM_THREADS=1): on a small shared CPU more threads only slow them down.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import signal
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from jem_core.checkpoint import CheckpointError, load_checkpoint, read_checkpoint, save_checkpoint
from jem_core.cli import main
from jem_core.models import ConvNet, build_model
from jem_core.training import resume_path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}




def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "jem_core", *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def cli_exit(args, capsys) -> tuple[int, str, str]:
    """Run the CLI in this process; returns (exit status, stdout, stderr)."""
    try:
        rc = main([str(a) for a in args])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


# ------------------------------------------------------------------------------------ image files
def _png(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A valid all-black 1-bit PNG of width x height pixels in a few tens of KB (built with zlib)."""
    row = b"\0" * (1 + (width + 7) // 8)
    comp = zlib.compressobj(9)
    data = b"".join(comp.compress(row * 64) for _ in range(height // 64)) + comp.compress(row * (height % 64))
    data += comp.flush()

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))


def _digit(mode: str = "L", size: int = 64, bg=0, fg=255) -> Image.Image:
    img = Image.new(mode, (size, size), bg)
    ImageDraw.Draw(img).rectangle((size // 2 - 5, size // 6, size // 2 + 5, size - size // 6), fill=fg)
    return img


def _noise_jpeg() -> bytes:
    rng = np.random.default_rng(0)
    return _png(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")


def _zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("digit.png", _png(_digit()))
    return buf.getvalue()


def test_score_cli_mixed_batch_reports_every_bad_file_and_scores_every_good_one(tiny_jem, tmp_path, capsys):
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))
    ImageDraw.Draw(rgba).rectangle((16, 6, 24, 34), fill=(20, 20, 20, 255))  # dark ink on transparent
    good = {
        "light_on_dark.png": _png(_digit()),
        "photo_dark_on_light.jpg": _png(_digit("RGB", 120, (235, 230, 220), (30, 30, 40)), "JPEG"),  # colour photo
        "rgba_transparent.png": _png(rgba),
        "sixteen_bit.png": _png(Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16))),
        "one_pixel.png": _png(Image.new("L", (1, 1), 200)),
    }
    bad = {  # name -> words the message must contain
        "notes.png": (b"just some text, not an image\n", "text"),
        "scan.png": (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\n", "pdf"),
        "archive.png": (_zip(), "zip"),
        "empty.png": (b"", "0 bytes"),
        "cut.png": (_png(_digit())[:60], "truncated"),
        "cut.jpg": (_noise_jpeg()[:900], "truncated"),
        "bomb.png": (_bomb_png(), "megapixel limit"),
    }
    order = ["light_on_dark.png", "notes.png", "photo_dark_on_light.jpg", "scan.png", "archive.png", "empty.png",
             "rgba_transparent.png", "cut.png", "cut.jpg", "bomb.png", "sixteen_bit.png", "missing.png", "one_pixel.png"]
    for name in order:
        if name in good:
            (tmp_path / name).write_bytes(good[name])
        elif name in bad:
            (tmp_path / name).write_bytes(bad[name][0])
    assert len(bad["bomb.png"][0]) < 100_000
    paths = [str(tmp_path / n) for n in order]
    start = time.perf_counter()
    r = run_cli("score", "--checkpoint", tiny_jem, *paths)
    unreadable = [p for n, p in zip(order, paths) if n not in good]
    # every readable image scored, and the status and one line say that some were not: a script can tell
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert f"error: {len(unreadable)} of {len(paths)} images could not be read ({', '.join(unreadable)})" in r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [row["image"] for row in rows] == paths, "one row per file, in order"
    for name, row in zip(order, rows):
        if name in good:
            assert "error" not in row, (name, row)
            assert 0 <= row["label"] < 10 and abs(sum(row["probabilities"]) - 1) < 1e-4
            assert row["log_px"] == pytest.approx(-row["energy"]) and 0 <= row["percentile"] <= 100
        else:
            words = bad[name][1] if name in bad else "not found"
            assert set(row) == {"image", "error"}, (name, row)
            assert name in row["error"] and words in row["error"].lower(), (name, row["error"])
    by_name = dict(zip(order, rows))
    assert by_name["photo_dark_on_light.jpg"]["inverted"] is True  # detected dark-on-light, inverted
    assert by_name["light_on_dark.png"]["inverted"] is False
    assert any("gray" in n.lower() for n in by_name["photo_dark_on_light.jpg"]["notes"])  # colour -> 1 channel
    assert time.perf_counter() - start < 120  # the bomb is refused from its header, not decoded
    # the choice is overridable: --invert no keeps the photo as it is (in this process: same code, no start-up)
    rc, out, _ = cli_exit(["score", "--checkpoint", tiny_jem, "--invert", "no", tmp_path / "photo_dark_on_light.jpg"], capsys)
    assert rc == 0 and json.loads(out)["inverted"] is False
    # a batch where nothing can be scored still answers every file, with exit status 2
    rc, out, err = cli_exit(["score", "--checkpoint", tiny_jem, tmp_path / "notes.png", tmp_path / "bomb.png"], capsys)
    assert rc == 2 and len(out.splitlines()) == 2 and "Traceback" not in err and "2 of 2 images" in err


# ------------------------------------------------------------------------------------ checkpoints
_META = {"arch": "convnet", "arch_kwargs": {"width": 8, "image_size": 8}, "in_channels": 1, "image_size": 8,
         "n_classes": 10, "dataset": "digits", "objective": "jem"}


class _RunsCommand:
    """Unpickling this runs a shell command (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickle_checkpoint_is_refused_by_every_entry_point_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "evil.pt"
    torch.save({"state_dict": ConvNet(1, 10, width=8, image_size=8).state_dict(), "metadata": _META,
                "payload": _RunsCommand(marker)}, evil)
    assert not marker.exists()
    img = tmp_path / "d.png"
    img.write_bytes(_png(_digit()))
    for args in (["score", "--checkpoint", evil, img], ["sample", "--checkpoint", evil, "--out", tmp_path / "s.png"],
                 ["train", "--dataset", "digits", "--init-from", evil, "--out", tmp_path / "t.pt", "--epochs", "1"]):
        rc, _, err = cli_exit(args, capsys)
        assert rc == 2 and "refused" in err and "Traceback" not in err, (args, err)
    with pytest.raises(CheckpointError, match="refused"):  # the app's upload path: raw bytes
        load_checkpoint(evil.read_bytes())
    plain = tmp_path / "evil.pkl"
    plain.write_bytes(pickle.dumps(_RunsCommand(marker)))  # a plain pickle, not torch's zip format
    for source in (plain, plain.read_bytes()):
        with pytest.raises(CheckpointError, match="refused"):
            load_checkpoint(source)
    assert not marker.exists(), "the pickled command ran"


def test_checkpoint_of_another_architecture_names_missing_and_unexpected_keys(tmp_path, capsys):
    wrn = build_model("wrn", 1, 10, {"depth": 10, "widen_factor": 1})
    path = tmp_path / "wrn_as_convnet.pt"
    save_checkpoint(path, wrn, _META)  # WRN weights, metadata claiming a ConvNet
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert "missing keys" in msg and "unexpected keys" in msg and "does not fit" in msg
    img = tmp_path / "d.png"
    img.write_bytes(_png(_digit()))
    rc, out, err = cli_exit(["score", "--checkpoint", path, img], capsys)
    assert rc == 2 and "missing keys" in err and out == "" and "Traceback" not in err
    # an image (not a checkpoint at all) given as --checkpoint
    rc, _, err = cli_exit(["score", "--checkpoint", img, img], capsys)
    assert rc == 2 and "not a readable checkpoint" in err and "PNG image" in err and "could run code" not in err


def test_upload_size_limit_is_set_in_streamlit_config():
    import tomllib

    from jem_core.images import MAX_BYTES

    cfg = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    limit_mb = cfg["server"]["maxUploadSize"]
    assert isinstance(limit_mb, int) and 1 <= limit_mb <= 1024
    # Image uploads have their own, smaller byte limit, checked with a clear message before decoding
    # (tests/test_images.py::test_upload_over_the_byte_limit_is_refused_before_decoding).
    assert MAX_BYTES <= limit_mb * 2**20


# ------------------------------------------------------------------------------------ training
_SMALL = ["--dataset", "digits", "--max-iters-per-epoch", "6", "--sgld-steps", "2", "--buffer-size", "100",
          "--keep-buffer", "10", "--n-reference", "50", "--quiet"]


def test_too_high_learning_rate_is_rolled_back_lowered_and_recorded(tmp_path, capsys):
    out = tmp_path / "lr10.pt"
    rc, stdout, err = cli_exit(["train", *_SMALL, "--epochs", "2", "--lr", "10", "--warmup-iters", "0",
                                "--max-retries", "10", "--out", out], capsys)
    assert rc == 0, err
    assert "rolled back" in err
    ck = load_checkpoint(out)
    events = ck.metadata["divergence_events"]
    assert len(events) >= 2 and all("above" in e["reason"] or "non-finite" in e["reason"] for e in events)
    scales = [e["new_lr_scale"] for e in events]
    assert scales == sorted(scales, reverse=True) and scales[-1] <= 0.25  # the rate went down each time
    assert json.loads(stdout.splitlines()[-1])["divergence_events"] == len(events)
    assert all(torch.isfinite(p).all() for p in ck.model.parameters())
    assert ck.metadata["metrics"]["epochs"] == 2


def _healthy_first_epoch(out: Path, capsys) -> tuple[bytes, bytes]:
    rc, _, err = cli_exit(["train", *_SMALL, "--epochs", "1", "--out", out], capsys)
    assert rc == 0, err
    return out.read_bytes(), resume_path(out).read_bytes()


@pytest.mark.parametrize("bad, reason", [
    (["--lr", "10", "--warmup-iters", "0", "--max-retries", "2"], "above"),
    (["--sgld-step-size", "1e6", "--no-sgld-clamp"], "SGLD samples left the data range"),
], ids=["lr-10", "sgld-step-size-1e6"])
def test_unrecoverable_divergence_stops_with_exit_3_and_keeps_the_last_good_checkpoint(bad, reason, tmp_path, capsys):
    out = tmp_path / "m.pt"
    good, good_resume = _healthy_first_epoch(out, capsys)
    rc, _, err = cli_exit(["train", *_SMALL, "--epochs", "3", "--resume", *bad, "--out", out], capsys)
    assert rc == 3, err
    assert "diverged" in err and "giving up" in err and reason in err and "Traceback" not in err
    assert f"The last good checkpoint is {out}" in err
    assert out.read_bytes() == good and resume_path(out).read_bytes() == good_resume  # untouched
    ck = load_checkpoint(out)
    assert ck.metadata["metrics"]["epochs"] == 1 and all(torch.isfinite(p).all() for p in ck.model.parameters())
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# ---------------------------------------------------------------------------- interrupted training
def _train_argv(out: Path, epochs: int, resume: bool) -> list[str]:
    # A big replay buffer (40k chains, ~10 MB in the resume file) makes every checkpoint write take a
    # while, so that kills land inside writes; two iterations per epoch and a save after every epoch.
    return [sys.executable, "-m", "jem_core", "train", "--dataset", "digits", "--epochs", str(epochs),
            "--max-iters-per-epoch", "2", "--batch-size", "16", "--sgld-steps", "1", "--buffer-size", "40000",
            "--keep-buffer", "8", "--n-reference", "40", "--warmup-iters", "0", "--out", str(out), "--quiet",
            # without a resume state, a fresh start: a kill may have come after the checkpoint's write and before
            # the resume state's, and an existing checkpoint is refused without --overwrite
            *(["--resume"] if resume else ["--overwrite"])]


def _temps(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith(".tmp"))


def _kill_during_write(proc: subprocess.Popen, folder: Path, nth: int) -> bool:
    """SIGKILL ``proc`` as soon as it has begun its ``nth`` checkpoint write of this run (a temp file
    appears). Returns False when the process ended first."""
    seen: set[str] = set(_temps(folder))  # stale ones from earlier kills do not count
    while proc.poll() is None:
        new = set(_temps(folder)) - seen
        if new:
            seen |= new
            nth -= 1
            if nth <= 0:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return True
        time.sleep(0.0005)
    return False


def _kill_after_progress(proc: subprocess.Popen, resume_file: Path, delay: float) -> bool:
    """SIGKILL ``proc`` ``delay`` seconds after it completed a checkpoint in this run."""
    before = resume_file.stat().st_mtime_ns if resume_file.exists() else None
    while proc.poll() is None:
        now = resume_file.stat().st_mtime_ns if resume_file.exists() else None
        if now is not None and now != before:
            time.sleep(delay)
            if proc.poll() is not None:
                return False
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.002)
    return False


def _check_every_checkpoint_loads(folder: Path) -> int | None:
    """Every .pt file in ``folder`` loads (none is ever corrupt); returns the resume state's epoch."""
    epoch = None
    for p in sorted(folder.glob("*.pt")):
        ck = load_checkpoint(p)  # weights checked key by key against the metadata's architecture
        assert all(torch.isfinite(t).all() for t in ck.model.state_dict().values())
        if p.name.endswith(".resume.pt"):
            t = read_checkpoint(p)["trainer"]
            epoch = int(t["epoch"])
            assert len(t["history"]) == epoch and len(t["buffer"]["buffer"]) == 40000
    return epoch


def test_sigkill_at_random_points_and_during_checkpoint_writes_then_resume_finishes(tmp_path):
    rng = random.Random(20240229)
    epochs = 12
    out = tmp_path / "run.pt"
    res = resume_path(out)
    plan = ["write", "time", "write"]  # kills timed into checkpoint writes, and one at a random point
    kills, mid_write, last_epoch = 0, 0, 0
    for mode in plan:
        proc = subprocess.Popen(_train_argv(out, epochs, res.exists()), cwd=ROOT, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            if mode == "write":
                killed = _kill_during_write(proc, tmp_path, rng.randint(1, 3))
            else:
                killed = _kill_after_progress(proc, res, rng.uniform(0.0, 0.3))
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            err = proc.stderr.read().decode() if proc.stderr else ""
        assert killed, f"the run ended before the planned kill ({mode}); stderr:\n{err}"
        kills += 1
        mid_write += bool(_temps(tmp_path))  # a temp file left behind: the kill landed inside a write
        epoch = _check_every_checkpoint_loads(tmp_path)
        if epoch is not None:
            assert epoch >= last_epoch, "progress is never lost"
            last_epoch = epoch
    assert kills == len(plan) and mid_write >= 1, (kills, mid_write)
    assert last_epoch < epochs
    final = subprocess.run(_train_argv(out, epochs, res.exists()), cwd=ROOT, env=ENV, capture_output=True,
                           text=True, timeout=300)
    assert final.returncode == 0, final.stderr
    assert json.loads(final.stdout.splitlines()[-1])["epochs"] == epochs
    assert _check_every_checkpoint_loads(tmp_path) == epochs
    ck = load_checkpoint(out)
    assert ck.metadata["metrics"]["epochs"] == epochs
    assert [h["epoch"] for h in ck.metadata["metrics"]["history"]] == list(range(1, epochs + 1))
    assert _temps(tmp_path) == [], "stale temp files of killed writes are removed by the next save"


def test_stale_temp_file_of_a_killed_writer_is_removed_by_the_next_save_only(tmp_path):
    from jem_core.checkpoint import atomic_torch_save

    target = tmp_path / "m.pt"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".m.pt.{dead.pid}.abcd1234.tmp"          # its writer is gone
    live = tmp_path / f".m.pt.{os.getppid()}.abcd1234.tmp"       # a live process's write in progress
    other = tmp_path / f".m.pt.resume.pt.{dead.pid}.abcd1234.tmp"  # another target's temp file
    for p in (stale, live, other):
        p.write_bytes(b"partial")
    atomic_torch_save({"v": torch.tensor(1)}, target)
    assert not stale.exists() and live.exists() and other.exists()
    assert torch.load(target, weights_only=True)["v"].item() == 1
    assert (target.stat().st_mode & 0o777) == (0o666 & ~_umask())  # not mkstemp's 0o600


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


# ------------------------------------------------------------------------------------ bad arguments
@pytest.mark.parametrize("args, message", [
    (["sample", "--checkpoint", "{ck}", "--out", "x.png", "--steps", "-1"], "--steps: must be >= 0"),
    (["sample", "--checkpoint", "{ck}", "--out", "x.png", "--n", "0"], "--n: must be >= 1"),
    (["train", "--dataset", "digits", "--epochs", "-2", "--out", "x.pt"], "--epochs: must be >= 1"),
    (["train", "--dataset", "digits", "--max-iters-per-epoch", "0", "--out", "x.pt"], "must be >= 1"),
    (["train", "--dataset", "digits", "--sgld-noise", "-0.1", "--out", "x.pt"], "must be a number >= 0"),
    (["train", "--dataset", "digits", "--reinit-freq", "2", "--out", "x.pt"], "reinit frequency must lie in [0, 1]"),
    (["train", "--dataset", "digits", "--sgld-step-size", "0", "--out", "x.pt"], "must be a positive number"),
    (["train", "--dataset", "npz:/nonexistent/data.npz", "--out", "x.pt"], "/nonexistent/data.npz"),
    (["train", "--dataset", "folder:/nonexistent/images", "--out", "x.pt"], "/nonexistent/images"),
    # a data root that cannot even be created: no download is attempted, offline or not
    (["train", "--dataset", "mnist", "--data-root", "{tmp}/a_file/root", "--out", "x.pt"], "Put the files at"),
    (["train", "--dataset", "digits", "--out", "{tmp}/never.pt", "--resume"], "no resume state"),
    (["train", "--dataset", "digits", "--judge", "bundled:nothere.pt", "--out", "{tmp}/j.pt"], "no such checkpoint"),
    (["score", "--checkpoint", "{tmp}/none.pt", "{tmp}/a.png"], "does not exist"),
    (["score", "--checkpoint", "{tmp}", "{tmp}/a.png"], "is a folder; give a .pt file in it"),
    (["likelihood", "--checkpoint", "{ck}", "--temps", "5", "--sweep", "10"], "smaller than --temps 5"),
    (["score", "--checkpoint", "{ck}", "--invert", "maybe", "a.png"], "invalid choice"),
])
def test_more_bad_arguments_give_argparse_errors_not_tracebacks(args, message, tiny_jem, tmp_path, capsys, monkeypatch):
    (tmp_path / "a_file").write_text("a file, not a folder")
    monkeypatch.setenv("JEM_DATA_ROOT", str(tmp_path / "a_file" / "root"))
    args = [a.format(ck=tiny_jem, tmp=tmp_path) for a in args]
    rc, _, err = cli_exit(args, capsys)
    assert rc == 2, err
    assert message in err and "Traceback" not in err


def test_an_output_that_cannot_be_written_or_would_replace_an_input_is_refused_before_any_work(
        tiny_jem, tmp_path, capsys, monkeypatch):
    import jem_core.generation

    calls = []
    monkeypatch.setattr(jem_core.generation, "draw_samples", lambda *a, **k: calls.append(a))  # no work may start
    folder, blocker = tmp_path / "folder", tmp_path / "a_file"
    folder.mkdir()
    blocker.write_text("a file")
    mine = tmp_path / "mine.pt"
    mine.write_bytes(Path(tiny_jem).read_bytes())
    cases = [
        (["sample", "--checkpoint", mine, "--out", mine], "is the input file of this command"),
        (["sample", "--checkpoint", tiny_jem, "--out", folder], "is a folder; give a file path inside it"),
        (["sample", "--checkpoint", tiny_jem, "--out", blocker / "s.png"], "a_file is a file, not a folder"),
        (["evaluate", "--checkpoint", tiny_jem, "--out", blocker], "is a file; give a folder"),
        (["likelihood", "--checkpoint", tiny_jem, "--out", folder], "is a folder"),
        (["train", "--dataset", "digits", "--out", mine], "exists: pass --resume to continue its run, --overwrite"),
    ]
    for args, message in cases:
        rc, _, err = cli_exit(args, capsys)
        assert rc == 2 and message in err and "Traceback" not in err, (args, err)
    assert calls == [] and mine.read_bytes() == Path(tiny_jem).read_bytes()  # nothing ran, nothing was replaced


def test_an_output_in_a_folder_where_nothing_can_be_created_is_refused_before_any_work(tiny_jem, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)  # read-only for a normal user; root bypasses modes, but no one may create files in /sys
    try:
        target = locked if os.geteuid() != 0 else Path("/sys")
        if not target.is_dir():
            pytest.skip("no folder here where file creation is refused")
        rc, _, err = cli_exit(["sample", "--checkpoint", tiny_jem, "--out", target / "new" / "s.png"], capsys)
    finally:
        locked.chmod(0o700)
    assert rc == 2 and f"{target} is not writable" in err and "choose another path" in err, err


def test_a_data_root_that_is_not_a_folder_is_named_in_a_note_not_passed_over(tiny_jem, tmp_path, capsys):
    out = tmp_path / "fill.png"
    rc, _, err = cli_exit(["inpaint", "--checkpoint", tiny_jem, "--data-root", tmp_path / "typo", "--n", "1",
                           "--steps", "1", "--out", out], capsys)
    assert rc == 0 and out.is_file(), err
    assert f"note: --data-root {tmp_path / 'typo'} is not a folder" in err


def test_train_overwrite_replaces_an_existing_checkpoint(tmp_path, capsys):
    out = tmp_path / "m.pt"
    out.write_text("an old checkpoint")
    rc, stdout, err = cli_exit(["train", "--dataset", "digits", "--epochs", "1", "--max-iters-per-epoch", "1",
                                "--sgld-steps", "1", "--buffer-size", "20", "--keep-buffer", "4", "--out", out,
                                "--quiet", "--overwrite"], capsys)
    assert rc == 0, err
    assert load_checkpoint(out).metadata["dataset"] == "digits"


# ------------------------------------------------------------------------------------ the app under load
_DIGITS = [ROOT / "checkpoints" / "digits_jem.pt", ROOT / "checkpoints" / "digits_baseline.pt"]
_needs_app = pytest.mark.skipif(not all(p.is_file() for p in _DIGITS) or not (ROOT / "app" / "Home.py").is_file(),
                                reason="the app or the bundled digits checkpoints are missing")


def _open(page: str):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app" / "Home.py"), default_timeout=300).run()
    assert not at.exception, at.exception
    if page != "home":
        at.switch_page(f"../pages/{page}.py").run()
        assert not at.exception, at.exception
    return at


def _metric(at, label: str) -> str:
    values = [m.value for m in at.metric if m.label == label]
    assert values, f"no metric {label!r}; have {[m.label for m in at.metric]}"
    return values[0]


def _langevin_session(seed: int, n: int, steps: int, step_size: float, noise: float):
    """A user on the Langevin page: live chains from noise with these settings, run to the end."""
    at = _open("langevin")
    at.number_input(key="lg_seed").set_value(seed)
    at.select_slider(key="lg_step_size").set_value(step_size)
    at.select_slider(key="lg_noise").set_value(noise)
    at.slider(key="lg_steps").set_value(steps)
    at.toggle(key="lg_auto_k").set_value(False).run()
    at.slider(key="lg_every").set_value(10)
    at.slider(key="lg_n").set_value(n)
    at.radio(key="lg_init").set_value("noise")
    at.run()
    at.button(key="lg_start").click().run()
    for _ in range(steps // 10 + 3):
        if _metric(at, "Status") != "running":
            break
        at.run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    assert _metric(at, "Status") == "finished" and _metric(at, f"SGLD steps done (of {steps})") == f"{steps}"
    chain = at.session_state["lg_live"]["chain"]
    return at, {"x": chain.x.clone(), "energies": torch.stack(chain.energy_history).clone()}


def _attack_session(eps: float):
    """A user on the Robustness page: FGSM on 30 test images at eps 0 and ``eps``."""
    at = _open("robustness")
    at.radio(key="rb_attack").set_value("fgsm").run()
    at.slider(key="rb_n").set_value(30)
    at.toggle(key="rb_refine").set_value(False)
    at.slider(key="rb_eps_linf").set_value(eps)
    at.slider(key="rb_points").set_value(2)
    at.run()
    at.button(key="rb_run").click().run()
    assert not at.exception and not at.error, (at.exception, [e.value for e in at.error])
    return at, {"curves": at.session_state["rb_result"]["curves"]}


def _apptest_concurrently(monkeypatch) -> None:
    """Let AppTest sessions run in several threads at once, as a real server runs its sessions.

    AppTest is written for one run at a time: every run installs a mock ``Runtime`` in a class attribute
    and patches ``config.get_option``, and removes both when it ends, so a run ending in one thread would
    pull the runtime from under a run in another. Here one shared mock runtime and one config patch stay
    in place for the whole test instead; the app's own code is untouched.
    """
    import contextlib
    from unittest.mock import MagicMock

    import streamlit.testing.v1.app_test as app_test_mod
    from streamlit.runtime import Runtime
    from streamlit.testing.v1.util import build_mock_config_get_option

    class _RuntimeSlot(Runtime):  # AppTest's per-run (re)setting of `_instance` lands here, not on Runtime
        pass

    shared = MagicMock(spec=Runtime)
    shared.media_file_mgr = app_test_mod.MediaFileManager(app_test_mod.MemoryMediaFileStorage("/mock/media"))
    shared.dataframe_source_mgr = app_test_mod.DataframeSourceManager()
    shared.cache_storage_manager = app_test_mod.MemoryCacheStorageManager()
    bidi = app_test_mod.BidiComponentManager()
    bidi.discover_and_register_components(start_file_watching=False)
    shared.bidi_component_registry = bidi
    monkeypatch.setattr(Runtime, "_instance", shared)
    monkeypatch.setattr(app_test_mod, "Runtime", _RuntimeSlot)
    monkeypatch.setattr(app_test_mod, "patch_config_options", lambda overrides: contextlib.nullcontext())
    from streamlit import config

    monkeypatch.setattr(config, "get_option", build_mock_config_get_option({"global.appTest": True}))


def _model_state(ck) -> dict:
    return {k: v.detach().clone() for k, v in ck.model.state_dict().items()}


def _assert_frozen_and_unchanged(ck, before: dict) -> None:
    m = ck.model
    assert not m.training and not any(mod.training for mod in m.modules()), "cached model left eval mode"
    assert all(not p.requires_grad and p.grad is None for p in m.parameters()), "cached model got gradients"
    now = m.state_dict()
    assert now.keys() == before.keys() and all(torch.equal(now[k], before[k]) for k in before), "weights changed"


@_needs_app
def test_concurrent_sessions_keep_their_own_chains_and_attacks_and_never_change_the_cached_model(monkeypatch):
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("JEM_EXPLORER_DEFAULT", "digits")
    _apptest_concurrently(monkeypatch)
    jobs = {"chains seed 1": lambda: _langevin_session(1, 6, 30, 1.0, 0.01),
            "chains seed 2": lambda: _langevin_session(2, 4, 20, 0.3, 0.02),
            "attack": lambda: _attack_session(0.2)}
    # Each user alone first: the reference results.
    alone = {name: job() for name, job in jobs.items()}
    ctx = alone["attack"][0].session_state["_jem_ctx"]
    cached = [ctx.model, ctx.baseline]
    before = [_model_state(ck) for ck in cached]
    # Then all at once, in three threads.
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        together = {name: f.result(timeout=600) for name, f in futures.items()}
    for name in jobs:
        ref, got = alone[name][1], together[name][1]
        assert ref.keys() == got.keys()
        for k in ref:
            if torch.is_tensor(ref[k]):
                assert torch.equal(ref[k], got[k]), f"{name}: {k} differs when run next to other sessions"
            else:
                assert ref[k] == got[k], f"{name}: {k} differs when run next to other sessions"
    a, b = together["chains seed 1"][0], together["chains seed 2"][0]
    assert a.session_state["lg_live"]["chain"].x.shape[0] == 6 and b.session_state["lg_live"]["chain"].x.shape[0] == 4
    assert "rb_result" not in a.session_state and "lg_live" not in together["attack"][0].session_state
    for at, _ in together.values():  # every session uses the one cached model, which no page changed
        c = at.session_state["_jem_ctx"]
        assert c.model is cached[0] and c.baseline is cached[1]
    for ck, state in zip(cached, before):
        _assert_frozen_and_unchanged(ck, state)


@_needs_app
def test_a_failing_page_shows_its_error_and_the_rest_of_the_app_keeps_working(monkeypatch):
    import jem_core.evaluation as evaluation

    monkeypatch.setenv("JEM_EXPLORER_DEFAULT", "digits")
    real = evaluation.calibration_report

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure in calibration_report")

    monkeypatch.setattr(evaluation, "calibration_report", broken)
    at = _open("calibration")
    assert not at.exception  # no uncaught exception: the page caught it
    errs = [e.value for e in at.error]
    assert any("This page hit an error" in e and "injected failure" in e for e in errs), errs
    assert at.sidebar.selectbox(key="sb_model").value == "digits_jem.pt (bundled)"  # the sidebar still works
    at.switch_page("../pages/langevin.py").run()  # another page of the same session still works
    assert not at.exception and not at.error and at.title[0].value
    monkeypatch.setattr(evaluation, "calibration_report", real)
    at.switch_page("../pages/calibration.py").run()  # and the page itself once the cause is gone
    assert not at.exception and not at.error and len(at.dataframe) >= 1


@_needs_app
def test_app_pages_score_the_good_files_of_a_mixed_upload_and_name_each_bad_one(monkeypatch):
    monkeypatch.setenv("JEM_EXPLORER_DEFAULT", "digits")
    files = [("seven.png", _png(_digit("RGB", 90, (235, 232, 225), (20, 20, 25))), "image/png"),
             ("bomb.png", _bomb_png(), "image/png"),
             ("notes.png", b"hello, not an image", "image/png"),
             ("cut.jpg", _noise_jpeg()[:900], "image/jpeg"),
             ("light.png", _png(_digit()), "image/png")]
    bad = {"bomb.png": "megapixel limit", "notes.png": "text file", "cut.jpg": "truncated"}
    at = _open("score")
    at.file_uploader(key="score_upload").set_value(files).run()
    assert not at.exception
    errs = [e.value for e in at.error]
    for name, words in bad.items():
        assert any(name in e and words in e for e in errs), (name, errs)
    images = list(at.dataframe[0].value["image"])
    assert images[:2] == ["seven.png", "light.png"]  # the good ones, scored (the page's examples follow)
    assert not {"bomb.png", "notes.png", "cut.jpg"} & set(images)
    at = _open("ood")
    at.slider(key="ood_n").set_value(50)
    at.multiselect(key="ood_sets").set_value(["uniform"])
    at.multiselect(key="ood_scores").set_value(["log_px"])
    at.file_uploader(key="ood_upload").set_value(files).run()
    assert not at.exception and not at.error
    warnings = [w.value for w in at.warning]
    for name, words in bad.items():
        assert any(f"Skipped {name}" in w and words in w for w in warnings), (name, warnings)
    assert "uploaded images" in set(at.dataframe[1].value["OOD set"])
