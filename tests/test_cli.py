"""The CLI on real checkpoints: train, sample, score; bad input gives argparse-style errors."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from jem_core.checkpoint import load_checkpoint
from jem_core.images import prepare_upload

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "jem_core", *map(str, args)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def test_train_writes_checkpoint_and_resume_continues(tmp_path):
    out = tmp_path / "m.pt"
    r = run_cli("train", "--dataset", "digits", "--epochs", "1", "--max-iters-per-epoch", "3", "--sgld-steps", "2",
                "--buffer-size", "100", "--keep-buffer", "10", "--out", out, "--quiet")
    lines = [json.loads(l) for l in r.stdout.splitlines() if l.startswith("{")]
    assert lines[0]["epoch"] == 1 and lines[-1]["checkpoint"] == str(out)
    assert out.exists() and Path(str(out) + ".resume.pt").exists()
    r = run_cli("train", "--dataset", "digits", "--epochs", "2", "--max-iters-per-epoch", "3", "--sgld-steps", "2",
                "--buffer-size", "100", "--keep-buffer", "10", "--out", out, "--quiet", "--resume")
    assert json.loads(r.stdout.splitlines()[-1])["epochs"] == 2


def test_sample_writes_a_png_grid(tiny_jem, tmp_path):
    png = tmp_path / "s.png"
    r = run_cli("sample", "--checkpoint", tiny_jem, "--out", png, "--n", "9", "--steps", "3", "--label", "4")
    img = Image.open(png)
    assert img.size[0] > 3 * 8 and json.loads(r.stdout.splitlines()[-1])["steps"] == 3


def test_score_prints_one_json_line_per_image_and_survives_bad_files(tiny_jem, tmp_path):
    good = tmp_path / "digit.png"
    arr = np.zeros((28, 28), np.uint8)
    arr[6:22, 12:16] = 255  # a light "1" on dark
    Image.fromarray(arr).save(good)
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    r = run_cli("score", "--checkpoint", tiny_jem, good, bad, tmp_path / "missing.png", check=False)
    assert r.returncode == 2 and "2 of 3 images could not be read" in r.stderr, r.stderr
    rows = [json.loads(l) for l in r.stdout.splitlines()]
    assert [row["image"] for row in rows] == [str(good), str(bad), str(tmp_path / "missing.png")]
    ok = rows[0]
    # the printed numbers are the model's own on the image as the CLI prepares it (digit-style, auto inversion)
    ck = load_checkpoint(tiny_jem)
    m = ck.metadata
    prep = prepare_upload(good.read_bytes(), good.name, int(m["in_channels"]), int(m["image_size"]), digit_style=True)
    with torch.no_grad():
        logits = ck.model(prep.tensor[None])[0].double()
    log_px = float(torch.logsumexp(logits, 0))
    assert ok["label"] == int(logits.argmax()) and ok["inverted"] == prep.inverted
    assert ok["probabilities"] == pytest.approx(torch.softmax(logits, 0).tolist(), abs=1e-5)
    assert ok["log_px"] == pytest.approx(log_px, abs=1e-4) and ok["energy"] == pytest.approx(-log_px, abs=1e-4)
    q = np.asarray(m["reference"]["logpx_quantiles"])  # percentile: linear interpolation in the reference quantiles
    assert ok["percentile"] == pytest.approx(float(np.interp(log_px, q, np.linspace(0, 100, len(q)))), abs=0.01)
    assert "error" in rows[1] and "error" in rows[2]


@pytest.mark.parametrize("args, message", [
    (["train", "--dataset", "digits", "--sgld-steps", "-3", "--out", "x.pt"], "--sgld-steps: must be >= 0"),
    (["train", "--dataset", "nope", "--out", "x.pt"], "unknown dataset 'nope'"),
    (["train", "--dataset", "svhn", "--data-root", "/nonexistent", "--out", "x.pt", "--epochs", "1"], "Put the files at"),
    (["sample", "--checkpoint", "missing.pt", "--out", "x.png"], "does not exist"),
    (["train", "--dataset", "digits", "--lr", "-1", "--out", "x.pt"], "--lr: must be a positive number"),
])
def test_bad_arguments_give_argparse_errors_not_tracebacks(args, message, tmp_path, monkeypatch):
    r = run_cli(*args, check=False)
    assert r.returncode == 2
    assert message in r.stderr and "Traceback" not in r.stderr


def test_sample_label_out_of_range_is_refused(tiny_jem, tmp_path):
    r = run_cli("sample", "--checkpoint", tiny_jem, "--out", tmp_path / "x.png", "--label", "12", check=False)
    assert r.returncode == 2 and "--label must lie in [0, 10)" in r.stderr


def test_translate_turns_threes_into_eights_on_the_bundled_digits_jem(tmp_path):
    png = tmp_path / "t.png"
    r = run_cli("translate", "--checkpoint", ROOT / "checkpoints" / "digits_jem.pt", "--from", "3", "--to", "8",
                "--n", "4", "--steps", "100", "--frames", "4", "--out", png)
    info = json.loads(r.stdout.splitlines()[-1])
    assert info["source"] == "test images" and info["reached_target"] >= 0.75  # measured: 1.0
    assert Image.open(png).size[0] > Image.open(png).size[1]  # 4 rows of 5 tiles


def test_inpaint_writes_original_masked_and_filled_rows(tiny_jem, tmp_path):
    png = tmp_path / "i.png"
    r = run_cli("inpaint", "--checkpoint", tiny_jem, "--mask", "left", "--n", "4", "--steps", "5", "--out", png)
    info = json.loads(r.stdout.splitlines()[-1])
    assert info["mask"] == "left" and info["steps"] == 5 and 0 < info["mean_abs_error"] < 2
    w, h = Image.open(png).size
    assert w > h  # three rows (original, masked, filled) of four


def test_translate_with_more_images_than_the_class_has_says_how_many_it_used(tiny_jem, tmp_path):
    from jem_core.data import load_dataset

    threes = int((load_dataset("digits", "test").y == 3).sum())
    r = run_cli("translate", "--checkpoint", tiny_jem, "--from", "3", "--to", "8", "--n", "999", "--steps", "1",
                "--frames", "1", "--out", tmp_path / "t.png")
    assert f"note: only {threes} start images were found" in r.stderr and "not the 999 of --n" in r.stderr


def test_translate_refuses_a_class_the_model_lacks(tiny_jem, tmp_path):
    r = run_cli("translate", "--checkpoint", tiny_jem, "--from", "11", "--to", "1", "--out", tmp_path / "x.png",
                check=False)
    assert r.returncode == 2 and "--from must lie in [0, 10)" in r.stderr and "Traceback" not in r.stderr


# -- which errors are the user's: BadInput -> one line and exit 2; anything else -> a traceback -----------------
def test_bad_input_from_the_library_is_one_clear_line_and_exit_2(capsys):
    from jem_core.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--dataset", "toy:moons?n=5", "--out", "unused.pt"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.splitlines() == [f"python -m jem_core train: error: {err.split('error: ', 1)[1].strip()}"]
    assert "n must lie in [40," in err and "toy:moons?n=5" in err and "usage:" not in err


def test_a_subcommand_check_prints_the_subcommand_usage(tiny_jem, tmp_path, capsys):
    from jem_core.cli import main

    with pytest.raises(SystemExit) as e:
        main(["sample", "--checkpoint", str(tiny_jem), "--out", str(tmp_path / "x.png"), "--label", "12"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--label must lie in [0, 10)" in err
    assert err.startswith("usage: python -m jem_core sample ") and "python -m jem_core sample: error:" in err
    assert "{train,sample" not in err  # not the top-level usage


def test_an_internal_value_error_is_a_traceback_not_exit_2(monkeypatch, capsys):
    import jem_core.data
    from jem_core.cli import main
    from jem_core.errors import BadInput

    def broken(spec):
        raise ValueError("a bug inside the library")

    monkeypatch.setattr(jem_core.data, "dataset_shape", broken)
    with pytest.raises(ValueError, match="a bug inside the library") as info:
        main(["train", "--dataset", "digits", "--out", "unused.pt"])
    assert not isinstance(info.value, BadInput) and "error:" not in capsys.readouterr().err

    def refused(spec):  # the same call raising the user-input class is reported as bad input
        raise BadInput(f"unknown dataset {spec!r}")

    monkeypatch.setattr(jem_core.data, "dataset_shape", refused)
    with pytest.raises(SystemExit) as e:
        main(["train", "--dataset", "digits", "--out", "unused.pt"])
    assert e.value.code == 2 and "train: error: unknown dataset 'digits'" in capsys.readouterr().err


def test_every_option_has_its_own_help_and_states_its_default():
    from jem_core.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for command, p in sub.choices.items():
        text = p.format_help()
        for action in p._actions:
            if not action.option_strings or action.dest == "help":
                continue
            name = action.option_strings[-1].lstrip("-")
            assert action.help and action.help.replace(" ", "-") != name, (command, name)  # not the flag's name again
        for flag, default in [("--seed", "0")] if command in ("sample", "inpaint", "translate") else []:
            assert f"(default: {default})" in " ".join(text.split()), (command, flag)
    train = " ".join(sub.choices["train"].format_help().split())
    assert "passes over the training split (default: 20)" in train and "(default: on)" in train
