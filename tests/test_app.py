"""AppTest tests of the dashboard on the bundled digits models: every page renders, and its main control
changes what is shown (more SGLD steps lower the chains' energy, eps = 0 leaves accuracy unchanged, ...).

The digits pair is selected with ``JEM_EXPLORER_DEFAULT=digits`` so that the tests stay fast; sizes are
kept small (tens of test images, tens of SGLD steps).
"""

from __future__ import annotations

import io
import sys
import time
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
HOME = str(ROOT / "app" / "Home.py")
DIGITS = [ROOT / "checkpoints" / "digits_jem.pt", ROOT / "checkpoints" / "digits_baseline.pt"]
PAGES = ["home", "langevin", "calibration", "robustness", "ood", "likelihood", "score", "train", "playground"]
TIMEOUT = 120  # seconds per script run: generous for loaded CI machines; a run takes well under a second here

pytestmark = pytest.mark.skipif(not all(p.is_file() for p in DIGITS),
                                reason="the bundled digits checkpoints are not in checkpoints/")


@pytest.fixture(autouse=True)
def digits_default(monkeypatch):
    monkeypatch.setenv("JEM_EXPLORER_DEFAULT", "digits")


def open_page(page: str):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(HOME, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    if page != "home":
        at.switch_page(f"../pages/{page}.py").run()
    assert not at.exception, at.exception
    return at


def errors(at) -> list[str]:
    return [e.value for e in at.error]


def metric(at, label: str) -> str:
    values = [m.value for m in at.metric if m.label == label]
    assert values, f"no metric {label!r}; have {[m.label for m in at.metric]}"
    return values[0]


def png(draw_seven: bool = True) -> bytes:
    img = Image.new("RGB", (120, 100), (235, 232, 225))  # a photo-like dark-on-light digit
    if draw_seven:
        d = ImageDraw.Draw(img)
        d.line([(35, 15), (85, 15)], fill=(20, 20, 25), width=9)
        d.line([(85, 15), (50, 90)], fill=(20, 20, 25), width=9)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders_without_exception(page):
    at = open_page(page)
    assert at.title, "page has no title"
    assert not errors(at)


def test_opens_on_the_digits_pair_with_a_note_and_model_cards():
    at = open_page("home")
    assert at.sidebar.selectbox(key="sb_model").value == "digits_jem.pt (bundled)"
    assert at.sidebar.selectbox(key="sb_baseline").value == "digits_baseline.pt (bundled)"
    assert any("digits" in i.value for i in at.sidebar.info)
    assert any("Data root in use" in c.value for c in at.sidebar.caption)
    assert 90 < float(metric(at, "Accuracy (360 test images)").rstrip("%")) <= 100
    assert 0 <= float(metric(at, "ECE (360 digits test images)")) < 0.5
    verdict = [m.value for m in at.markdown if m.value.startswith("**Calibration, measured here.**")]
    assert verdict and "ECE of **digits_jem**" in verdict[0] and "95% CI" in verdict[0]


def test_default_pair_prefers_mnist_from_the_data_root_or_the_demo_pack(tmp_path, monkeypatch):
    from app import ui
    from jem_core import data

    monkeypatch.delenv("JEM_EXPLORER_DEFAULT")
    entries = [ui.ModelEntry(f"{n} (bundled)", "bundled", f"/x/{n}") for n in
               ("digits_baseline.pt", "digits_jem.pt", "mnist_baseline.pt", "mnist_jem.pt")]
    # An empty data root: the bundled demo pack serves MNIST's test split.
    model, base, note = ui._default_pair(entries, tmp_path)
    assert (model, base) == ("mnist_jem.pt (bundled)", "mnist_baseline.pt (bundled)")
    assert "demo pack" in note
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "t10k-images-idx3-ubyte").write_bytes(b"")
    model, base, note = ui._default_pair(entries, tmp_path)
    assert (model, base) == ("mnist_jem.pt (bundled)", "mnist_baseline.pt (bundled)")
    assert str(tmp_path) in note and "demo pack" not in note
    # Neither the data root nor the pack: the digits pair, and the note says why.
    monkeypatch.setattr(data, "DEMO_PACK_DIR", tmp_path / "no_pack")
    model, base, note = ui._default_pair(entries, tmp_path / "empty")
    assert (model, base) == ("digits_jem.pt (bundled)", "digits_baseline.pt (bundled)")
    assert "no MNIST test images were found" in note
    # Without the MNIST JEM the digits pair stays the default, and the note says why.
    model, base, note = ui._default_pair(entries[:3], tmp_path)
    assert model == "digits_jem.pt (bundled)" and "not bundled" in note


def test_sidebar_note_follows_the_chosen_model():
    at = open_page("home")
    assert any(i.value.startswith("Opened on the digits models") for i in at.sidebar.info)
    at.sidebar.selectbox(key="sb_baseline").set_value("(none)").run()
    note = [i.value for i in at.sidebar.info]
    assert any(v.startswith("Showing **digits_jem** (no baseline), chosen in the picker") for v in note), note


def test_bad_upload_keeps_the_previous_model_and_a_good_one_is_selected():
    at = open_page("home")
    at.sidebar.file_uploader(key="sb_upload").set_value(("broken.pt", b"not a checkpoint", "application/octet-stream"))
    at.run()
    assert not at.exception
    assert any("Could not load broken.pt" in e.value for e in at.sidebar.error)
    assert at.sidebar.selectbox(key="sb_model").value == "digits_jem.pt (bundled)"
    at.sidebar.file_uploader(key="sb_upload").set_value(("mine.pt", DIGITS[1].read_bytes(), "application/octet-stream"))
    at.run()
    assert not at.exception
    assert at.sidebar.selectbox(key="sb_model").value.startswith("mine.pt (uploaded")


def test_langevin_chains_start_by_themselves_from_the_replay_buffer():
    at = open_page("langevin")
    assert metric(at, "Status") == "running" and metric(at, "SGLD steps done (of 200)") == "10"
    captions = [c for img in at.image for c in img.captions]
    assert any("chains from replay buffer" in c for c in captions), captions
    # While the chains run, the traces are one picture (cheap for a browser to redraw); paused, plotly charts.
    assert any(c.startswith("Traces up to step 10, redrawn every 1 s") for c in captions), captions
    assert not at.get("plotly_chart")
    at.button(key="lg_pause").click().run()
    assert metric(at, "Status") == "paused" and len(at.get("plotly_chart")) == 2
    assert not any(c.startswith("Traces up to step") for img in at.image for c in img.captions)
    at.button(key="lg_reset").click().run()  # a reset is not undone by the automatic start
    at.run()
    assert not [m for m in at.metric if m.label.startswith("SGLD steps done")]


def test_langevin_more_steps_lower_the_mean_energy_and_buttons_follow_the_state():
    at = open_page("langevin")
    at.button(key="lg_reset").click().run()  # stop the chains that started by themselves
    at.slider(key="lg_steps").set_value(40)
    at.toggle(key="lg_auto_k").set_value(False).run()
    at.slider(key="lg_every").set_value(10)
    at.slider(key="lg_n").set_value(8)
    at.radio(key="lg_init").set_value("noise")
    at.run()
    assert at.button(key="lg_pause").disabled and at.button(key="lg_reset").disabled
    at.button(key="lg_start").click().run()  # the live fragment runs once per script run: 10 steps
    assert metric(at, "SGLD steps done (of 40)") == "10"
    assert not at.button(key="lg_pause").disabled
    early = float(metric(at, "Mean energy E(x)"))
    at.button(key="lg_pause").click().run()
    assert metric(at, "Status") == "paused" and metric(at, "SGLD steps done (of 40)") == "10"
    at.button(key="lg_resume").click().run()
    while metric(at, "Status") == "running":
        at.run()
    assert metric(at, "SGLD steps done (of 40)") == "40" and metric(at, "Status") == "finished"
    late = float(metric(at, "Mean energy E(x)"))
    assert late < early, (early, late)
    assert at.button(key="lg_pause").disabled and at.button(key="lg_resume").disabled
    at.slider(key="lg_steps").set_value(20).run()  # a target lowered below the steps done: no "40 / 20"
    assert metric(at, "SGLD steps done") == "40" and metric(at, "Status") == "finished"
    at.slider(key="lg_steps").set_value(40)
    at.button(key="lg_reset").click().run()
    assert not [m for m in at.metric if m.label.startswith("SGLD steps done")]
    assert not errors(at)
    at.radio(key="lg_init").set_value("test").run()  # chains from test images (digits load offline)
    at.button(key="lg_start").click().run()
    assert not at.exception and not errors(at) and metric(at, "SGLD steps done (of 40)") == "10"


def test_chosen_reads_an_option_a_label_or_falls_back_to_the_first_option():
    """The Langevin page's Start and the playground's buttons read their choice widgets through ``ui.chosen``:
    Streamlit may hand a callback a widget's label (``'class 1'``) instead of its option (``1``). (AppTest cannot
    hold a label in a radio's state, so this is checked on the helper.)"""
    import streamlit as st

    from app import ui

    options, label = ["unconditional", 0, 1, 2], (lambda o: o if isinstance(o, str) else f"class {o}")
    for held, want in ((2, 2), ("class 1", 1), ("unconditional", "unconditional"), ("class 9", "unconditional"),
                       (2.5, "unconditional"), (True, "unconditional")):
        st.session_state["t_choice"] = held
        got = ui.chosen("t_choice", options, label)
        assert got == want and type(got) is type(want), (held, got)
    del st.session_state["t_choice"]
    assert ui.chosen("t_choice", options, label) == "unconditional"
    with pytest.raises(ValueError, match="no options"):
        ui.chosen("t_choice", [], label)


def test_langevin_inpainting_and_class_translation_show_results():
    at = open_page("langevin")
    assert not [w for w in at.slider if w.key in ("lp_n", "ct_n")]  # only the open tab (Chains) is drawn
    at.session_state["lg_tab"] = "In-painting"
    at.run()
    assert not [w for w in at.slider if w.key in ("lg_n", "ct_n")]
    at.slider(key="lp_n").set_value(2)
    at.slider(key="lp_steps").set_value(10)
    at.button(key="lp_run").click().run()
    assert not at.exception and not errors(at)
    captions = [c for img in at.image for c in img.captions]
    assert any("in-painted after 10 steps" in c for c in captions), captions
    at.session_state["lg_tab"] = "Class translation"
    at.run()
    at.slider(key="ct_n").set_value(2)
    at.slider(key="ct_steps").set_value(10)
    at.slider(key="ct_frames").set_value(2)
    at.button(key="ct_run").click().run()
    assert not at.exception and not errors(at)
    captions = [c for img in at.image for c in img.captions]
    assert any(c.startswith("0 -> 1") for c in captions), captions


def test_home_and_calibration_bootstrap_the_ece_once_per_run(monkeypatch):
    """The ECE intervals beside each model and the verdict's paired difference come from one bootstrap."""
    import jem_core.evaluation.verdicts as verdicts

    calls = []
    real = verdicts._ece_boot
    monkeypatch.setattr(verdicts, "_ece_boot", lambda pairs, *a: (calls.append(len(pairs)), real(pairs, *a))[1])
    at = open_page("home")
    assert calls == [2] and "Calibration, measured here" in " ".join(m.value for m in at.markdown)
    assert sum("ECE 0." in c.value and "(bootstrap)" in c.value for c in at.caption) == 2
    calls.clear()
    at.switch_page("../pages/calibration.py").run()
    assert not at.exception and calls == [2]


def test_calibration_table_and_bin_count():
    at = open_page("calibration")
    table = at.dataframe[0].value
    assert list(table["model"]) == ["digits_jem", "digits_baseline"]
    assert {"accuracy", "ECE", "MCE", "NLL", "Brier"} <= set(table.columns)
    from jem_core.checkpoint import load_checkpoint
    from jem_core.data import load_dataset
    from jem_core.evaluation import calibration_report, predict_proba

    test = load_dataset("digits", "test")
    for i, path in enumerate(DIGITS):  # the first n (all 360) test images, 15 bins
        want = calibration_report(predict_proba(load_checkpoint(path).model, test.x), test.y, 15)
        assert table["accuracy"][i] == pytest.approx(want.accuracy, abs=1e-6)
        assert table["ECE"][i] == pytest.approx(want.ece, abs=1e-6) and table["MCE"][i] == pytest.approx(want.mce, abs=1e-6)
    # the metrics above the table: each model's ECE, and the paired difference of the first two with its interval
    for i, name in enumerate(table["model"]):
        assert float(metric(at, f"ECE: {name}")) == pytest.approx(table["ECE"][i], abs=6e-5)
    diff = float(metric(at, "ECE difference: digits_jem - digits_baseline"))
    assert diff == pytest.approx(table["ECE"][0] - table["ECE"][1], abs=1e-4)
    (ci,) = [c.value for c in at.caption if c.value.startswith("95% CI") and "to" in c.value]
    lo, hi = (float(v) for v in ci.split("95% CI ")[1].split(" (")[0].split(" to "))
    assert lo <= diff <= hi and ("excludes 0" in ci) == (lo > 0 or hi < 0)
    assert len(at.dataframe[1].value) == 2 * 15
    at.slider(key="cal_bins").set_value(5).run()
    assert len(at.dataframe[1].value) == 2 * 5
    at.radio(key="cal_layout").set_value("Side by side").run()
    assert not at.exception and not errors(at)


def test_robustness_eps_zero_leaves_accuracy_unchanged_and_fgsm_lowers_it():
    at = open_page("robustness")
    at.radio(key="rb_attack").set_value("fgsm").run()
    at.slider(key="rb_n").set_value(30)
    at.toggle(key="rb_refine").set_value(False)
    at.slider(key="rb_eps_linf").set_value(0.0)
    at.run()
    at.button(key="rb_run").click().run()
    assert not at.exception and not errors(at)
    table = at.dataframe[0].value
    assert list(table["eps"]) == [0.0]
    for name in ("digits_jem", "digits_baseline"):
        clean = float(metric(at, f"Clean accuracy: {name}"))  # shown with 4 decimals
        assert table[f"accuracy: {name}"][0] == pytest.approx(clean, abs=1e-4)
    at.slider(key="rb_eps_linf").set_value(0.3)
    at.slider(key="rb_points").set_value(2)
    at.run()
    at.button(key="rb_run").click().run()
    table = at.dataframe[0].value
    assert list(table["eps"]) == [0.0, 0.3]
    acc = table["accuracy: digits_baseline"]
    assert acc[1] < acc[0]
    assert not errors(at)


def test_ood_score_choice_and_sets_change_the_table():
    at = open_page("ood")
    at.slider(key="ood_n").set_value(50)
    at.multiselect(key="ood_sets").set_value(["uniform", "inverted"])
    at.multiselect(key="ood_scores").set_value(["log_px"])
    at.run()
    table = at.dataframe[1].value
    assert set(table["score"]) == {"log p(x)"}
    assert set(table["OOD set"]) == {"uniform noise", "inverted images"}
    jem_uniform = table[(table["model"] == "digits_jem") & (table["OOD set"] == "uniform noise")]
    assert float(jem_uniform["AUROC"].iloc[0]) > 0.9  # noise is far from the data under log p(x)
    at.multiselect(key="ood_scores").set_value(["max_prob", "neg_grad_norm"]).run()
    assert set(at.dataframe[1].value["score"]) == {"max p(y|x)", "-||∇x log p(x)||"}
    at.file_uploader(key="ood_upload").set_value([("a.png", png(), "image/png"), ("b.png", png(False), "image/png")])
    at.run()
    assert "uploaded images" in set(at.dataframe[1].value["OOD set"])
    assert not at.exception and not errors(at)


def test_score_shows_scored_examples_before_any_upload():
    at = open_page("score")
    table = at.dataframe[0].value
    assert list(table["image"]) == ["test image 0 (label 7)", "test image 1 (label 6)",
                                    "Fashion-MNIST test image 0", "uniform noise"]
    assert list(table["unusual"])[-1], "uniform noise is flagged as unusual"
    assert len(at.get("plotly_chart")) >= 4
    # each verdict names the images its percentile ranks against: the checkpoint's own reference set
    from jem_core.checkpoint import load_checkpoint

    split = load_checkpoint(ROOT / "checkpoints" / "digits_jem.pt").metadata["reference"]["split"]
    verdicts = [e.value for e in [*at.success, *at.warning] if "log p(x) is at percentile" in e.value]
    assert len(verdicts) == len(table) and all(f"of the checkpoint's reference images, {split}" in v
                                               for v in verdicts), verdicts


def test_score_upload_shows_prediction_and_a_bad_file_an_error():
    at = open_page("score")
    at.toggle(key="score_examples").set_value(False).run()
    at.file_uploader(key="score_upload").set_value([("seven.png", png(), "image/png"),
                                                    ("notes.png", b"hello, not an image", "image/png")])
    at.run()
    assert not at.exception
    assert any("notes.png" in e and "text file" in e for e in errors(at))
    lines = [m.value for m in at.markdown if m.value.startswith("Predicted label:")]
    assert len(lines) == 1 and lines[0].replace("*", "").split(":")[1].strip()[0].isdigit()
    assert len(at.dataframe[0].value) == 1
    auto_energy = metric(at, "Energy E(x)")
    at.radio(key="score_invert").set_value("Don't invert").run()  # the model now sees dark-on-light
    assert metric(at, "Energy E(x)") != auto_energy
    at.radio(key="score_method").set_value("integrated_gradients").run()
    assert not at.exception


def test_train_in_the_background_stop_and_the_model_joins_the_picker():
    at = open_page("train")
    at.radio(key="tr_objective").set_value("jem")
    at.slider(key="tr_epochs_True").set_value(50)
    at.number_input(key="tr_max_iters").set_value(2)
    at.slider(key="tr_sgld_steps_True").set_value(2)
    at.select_slider(key="tr_buffer_True").set_value(500)
    at.run()
    at.button(key="tr_start").click().run()
    assert not at.exception and not errors(at)
    assert not at.button(key="tr_stop").disabled
    deadline = time.time() + 120
    while metric(at, "Iteration") in ("0",) and time.time() < deadline:
        time.sleep(0.3)
        at.run()
    at.button(key="tr_stop").click().run()
    while metric(at, "Status") == "running" and time.time() < deadline:
        time.sleep(0.3)
        at.run()
    assert metric(at, "Status") == "stopped"
    at.run()
    assert any(o.endswith("(trained here)") for o in at.sidebar.selectbox(key="sb_model").options)
    assert any("model picker" in s.value for s in at.success)
    assert not errors(at)
    # The run's folder keeps the checkpoint the picker reads; the resume state (never read by the app) is gone.
    out = Path(at.session_state["tr_run"]["out"])
    assert out.is_file() and out.parent.name.startswith("jem_explorer_train_")
    assert not Path(str(out) + ".resume.pt").exists()


def test_run_folders_are_deleted_once_nothing_can_use_them(tmp_path):
    from app.runs import RunFolders

    alive = {"a": True, "b": True}
    folders = RunFolders(lambda s: alive.get(s, False), root=str(tmp_path))
    kept, empty, running = folders.new("a"), folders.new("a"), folders.new("b")
    for f in (kept, running):
        (f / "m.pt").write_bytes(b"weights")
        (f / "m.pt.resume.pt").write_bytes(b"optimizer and whole buffer")
    folders.ended(kept, kept / "m.pt")
    folders.ended(empty, empty / "m.pt")  # the run ended before writing a checkpoint
    assert sorted(p.name for p in kept.iterdir()) == ["m.pt"] and not empty.exists()
    assert folders.sweep() == [] and kept.exists()  # its session still uses it (the picker)
    alive["a"] = alive["b"] = False  # both tabs closed
    assert folders.sweep() == [kept] and not kept.exists()
    assert running.exists() and (running / "m.pt.resume.pt").exists()  # still training: kept
    folders.ended(running, running / "m.pt")
    assert folders.sweep() == [running] and not running.exists()
    last = folders.new("c")
    folders.remove_all()  # at server exit
    assert not last.exists() and folders.folders == [] and list(tmp_path.iterdir()) == []


MNIST_PAIR = [ROOT / "checkpoints" / "mnist_jem.pt", ROOT / "checkpoints" / "mnist_baseline.pt"]


@pytest.mark.skipif(not all(p.is_file() for p in MNIST_PAIR), reason="no bundled MNIST pair")
def test_a_fresh_offline_machine_opens_on_mnist_and_evaluates_on_the_demo_pack(monkeypatch, tmp_path):
    from streamlit.testing.v1 import AppTest

    monkeypatch.delenv("JEM_EXPLORER_DEFAULT")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.cache data root either
    monkeypatch.setenv("JEM_DATA_ROOT", str(tmp_path / "empty_root"))
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    at.query_params["cal_n"] = "300"  # keep the test small: the same code path as the default 2,000
    at.query_params["ood_n"] = "100"
    at.run()
    assert not at.exception, at.exception
    assert at.sidebar.selectbox(key="sb_model").value == "mnist_jem.pt (bundled)"
    assert at.sidebar.selectbox(key="sb_baseline").value == "mnist_baseline.pt (bundled)"
    assert any("demo pack" in i.value for i in at.sidebar.info)
    at.switch_page("../pages/calibration.py").run()
    assert not at.exception and not errors(at)
    table = at.dataframe[0].value
    assert list(table["model"]) == ["mnist_jem", "mnist_baseline"] and (table["accuracy"] > 0.9).all()
    assert any("ECE of **mnist_jem**" in m.value for m in at.markdown)
    at.switch_page("../pages/ood.py").run()
    assert not at.exception and not errors(at)
    assert "fashion_mnist (test split)" in at.multiselect(key="ood_sets").options
    ood = at.dataframe[1].value
    fashion = ood[(ood["model"] == "mnist_jem") & (ood["OOD set"] == "fashion_mnist (test split)")
                  & (ood["score"] == "log p(x)")]
    assert float(fashion["AUROC"].iloc[0]) > 0.9


@pytest.mark.skipif(not (ROOT / "checkpoints" / "mnist_jem.pt").is_file(), reason="no bundled MNIST JEM")
def test_an_mnist_model_scores_uploads_without_any_mnist_data(monkeypatch, tmp_path):
    from jem_core import data

    monkeypatch.delenv("JEM_EXPLORER_DEFAULT")
    monkeypatch.setenv("JEM_DATA_ROOT", str(tmp_path))  # an empty data root ...
    monkeypatch.setattr(data, "DEMO_PACK_DIR", tmp_path / "no_pack")  # ... and no demo pack
    at = open_page("score")
    assert at.sidebar.selectbox(key="sb_model").value == "digits_jem.pt (bundled)"
    assert any("no MNIST test images were found" in i.value for i in at.sidebar.info)
    at.sidebar.selectbox(key="sb_model").set_value("mnist_jem.pt (bundled)").run()
    at.file_uploader(key="score_upload").set_value(("seven.png", png(), "image/png")).run()
    assert not at.exception and not errors(at)
    assert [m for m in at.markdown if m.value.startswith("Predicted label:")]


def test_a_link_reproduces_the_view_and_a_bad_value_is_named():
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    at.query_params["sb_baseline"] = "(none)"
    at.run()
    at.switch_page("../pages/robustness.py")
    for k, v in {"rb_attack": "fgsm", "rb_n": "20", "rb_points": "2", "rb_steps": "999"}.items():
        at.query_params[k] = v
    at.run()
    assert not at.exception
    assert at.radio(key="rb_attack").value == "fgsm" and at.slider(key="rb_n").value == 20
    assert at.slider(key="rb_points").value == 2
    assert any("rb_steps='999' was ignored" in w.value for w in at.warning)
    table = at.dataframe[0].value  # the link's attack was computed at once, without a click
    assert len(table) == 2 and list(table.columns) == ["eps", "accuracy: digits_jem", "95% CI: digits_jem"]
    at.slider(key="rb_points").set_value(3).run()  # the user's change wins and goes into the link
    assert at.query_params["rb_points"] in ("3", ["3"]) and at.query_params["sb_baseline"] in ("(none)", ["(none)"])
    at.switch_page("../pages/calibration.py").run()
    assert "rb_points" not in at.query_params, "another page's settings leave the link"


def test_a_link_whose_baseline_or_dataset_does_not_fit_the_model_says_what_it_used_instead():
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(HOME, default_timeout=TIMEOUT)
    at.query_params["sb_model"] = "digits_jem.pt (bundled)"
    at.query_params["sb_baseline"] = "mnist_baseline.pt (bundled)"  # 28x28 inputs against the digits model's 8x8
    at.query_params["sb_dataset"] = "fashion_mnist"
    at.run()
    assert not at.exception
    assert at.sidebar.selectbox(key="sb_baseline").value == "digits_baseline.pt (bundled)"
    assert at.sidebar.selectbox(key="sb_dataset").value == "digits"
    warned = [w.value for w in at.sidebar.warning]
    assert any("baseline 'mnist_baseline.pt (bundled)' does not take the input shape of digits_jem.pt (bundled), "
               "so 'digits_baseline.pt (bundled)' is shown" in w for w in warned), warned
    assert any("dataset 'fashion_mnist' has another image shape than the model, so the model's own, 'digits', is used"
               in w for w in warned), warned
    at.sidebar.selectbox(key="sb_model").set_value("mnist_jem.pt (bundled)").run()  # the user's own change: no warning
    assert not [w for w in at.sidebar.warning if "The link's" in w.value]


def test_a_link_with_one_unknown_ood_set_keeps_the_known_ones_and_names_the_other():
    from streamlit.testing.v1 import AppTest

    known = open_page("ood").multiselect(key="ood_sets").value[-1]
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT).run()
    at.switch_page("../pages/ood.py")
    at.query_params["ood_sets"] = f"bar,{known}"
    at.run()
    assert not at.exception
    assert at.multiselect(key="ood_sets").value == [known]
    assert any("Part of the link's setting ood_sets=" in w.value and "'bar' is not among" in w.value
               for w in at.warning), [w.value for w in at.warning]


def test_every_page_shows_a_chart_or_an_image_before_any_click():
    at = open_page("home")
    for page in PAGES:
        if page != "home":
            at.switch_page(f"../pages/{page}.py").run()
        assert not at.exception and not errors(at), page
        assert at.get("plotly_chart") or len(at.image), f"{page} shows no chart and no image on first load"


def test_a_cancelled_attack_leaves_the_page_usable_and_no_thread_behind():
    import threading

    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(HOME, default_timeout=TIMEOUT).run()
    threads = threading.active_count()
    at.session_state["_jem_cancel"] = True  # what the Cancel button's click leaves for the rerun it causes
    at.query_params["rb_n"] = "17"  # settings no other test computed, so the attack is not in the cache
    at.switch_page("../pages/robustness.py").run()
    assert not at.exception and not errors(at)
    assert any(i.value.startswith("Cancelled: Attacking 17 test images") for i in at.info)
    assert "rb_result" not in at.session_state and not at.dataframe
    at.run()  # cancelled once: the page waits for the button instead of starting again
    assert not at.dataframe and any("Press **Run attacks**" in i.value for i in at.info)
    assert threading.active_count() <= threads
    at.button(key="rb_run").click().run()
    assert not at.exception and len(at.dataframe[0].value) == 4


def test_score_explains_its_verdict_with_the_test_histograms_and_shows_preprocessing_pictures():
    import numpy as np

    from bench.photo_digits import photo_of_digit

    at = open_page("score")
    at.toggle(key="score_examples").set_value(False)
    x = np.zeros((28, 28), np.uint8)
    x[5:23, 12:16] = 255
    at.file_uploader(key="score_upload").set_value(("photo.jpg", photo_of_digit(x, np.random.default_rng(0)),
                                                    "image/jpeg")).run()
    assert not at.exception and not errors(at)
    why = [d.value for d in at.dataframe if "percentile among test images" in d.value.columns]
    assert why, "the verdict's table is shown"
    table = why[0]
    assert set(table["score"]) == {"log p(x)", "max p(y|x)", "-||∇x log p(x)||"}
    assert all(0 <= v <= 100 for v in table["percentile among test images"])
    assert set(table["test images flagged by it"]) == {"5.0%"} or all(
        abs(float(v.rstrip("%")) - 5) < 1 for v in table["test images flagged by it"])
    captions = [c for img in at.image for c in img.captions]
    assert "as decoded" in captions and "levels" in captions


def test_heavy_work_waits_for_a_free_worker_and_live_chains_skip_a_tick_instead_of_queueing():
    import threading

    from app import ui

    w = ui._workers()
    at = open_page("langevin")
    at.button(key="lg_reset").click().run()
    held = [w["sem"].acquire(timeout=30) for _ in range(ui.N_WORKERS)]  # every worker busy elsewhere
    assert all(held)
    try:
        at.button(key="lg_start").click().run()  # the chains start, but find no free worker
        assert metric(at, "SGLD steps done (of 200)") == "0"
        assert any("every worker of this server was busy" in c.value for c in at.caption)
        time.sleep(2.1)  # still no free worker after STARVED_S (2 s): one step outside the workers, never frozen
        at.run()
        stepped = time.monotonic()
        assert metric(at, "SGLD steps done (of 200)") == "1"
        at.run()  # and not one more until another STARVED_S has passed
        assert metric(at, "SGLD steps done (of 200)") == "1" or time.monotonic() - stepped >= 2.0
    finally:
        for _ in held:
            w["sem"].release()
    at.run()
    assert metric(at, "SGLD steps done (of 200)") != "0", "with a free worker the chains go on by themselves"

    held = [w["sem"].acquire(timeout=30) for _ in range(ui.N_WORKERS)]
    threading.Timer(2.0, lambda: [w["sem"].release() for _ in held]).start()
    t0 = time.monotonic()
    at.query_params["rb_n"] = "13"  # an attack no other test computed
    at.switch_page("../pages/robustness.py").run()
    assert time.monotonic() - t0 >= 1.9, "the attack waited for a worker instead of oversubscribing the cores"
    assert not at.exception and not errors(at) and len(at.dataframe[0].value) == 4


def test_a_worker_can_be_awaited_for_a_bounded_time_and_live_chains_that_missed_a_tick_wait_a_moment(monkeypatch):
    import contextlib
    import threading

    from app import ui

    w = ui._workers()
    held = [w["sem"].acquire(timeout=30) for _ in range(ui.N_WORKERS)]
    try:
        t0 = time.monotonic()
        with ui.worker("x", wait=0.2) as got:
            assert not got and time.monotonic() - t0 >= 0.19, "every slot busy: it waited 0.2 s, then gave up"
        threading.Timer(0.2, w["sem"].release).start()
        held.pop()
        t0 = time.monotonic()
        with ui.worker("x", wait=10.0) as got:
            assert got and 0.15 <= time.monotonic() - t0 < 5, "a slot freed within the wait: it got it"
            assert ui.workers_busy() == 1
        assert ui.workers_busy() == 0
    finally:
        for _ in held:
            w["sem"].release()

    asked = []
    real = ui.worker

    @contextlib.contextmanager
    def recording(label, wait=True):
        asked.append(wait)
        with real(label, wait) as got:
            yield got

    monkeypatch.setattr(ui, "worker", recording)
    at = open_page("langevin")
    at.button(key="lg_reset").click().run()
    held = [w["sem"].acquire(timeout=30) for _ in range(ui.N_WORKERS)]
    try:
        at.button(key="lg_start").click().run()
        assert asked[-1] is False, "a live view asks for a worker without waiting"
        at.run()
        assert not isinstance(asked[-1], bool) and 0 < asked[-1] <= ui.CHAIN_INTERVAL, \
            "its last tick found no free worker: this one waits, at most half a refresh interval"
    finally:
        for _ in held:
            w["sem"].release()
    at.run()
    at.run()
    assert asked[-1] is False, "once it got a worker, it asks without waiting again"
    assert metric(at, "SGLD steps done (of 200)") not in ("0", "1")


def test_one_training_run_at_a_time_and_the_second_session_is_told_why():
    first, second = open_page("train"), open_page("train")
    for at in (first, second):
        at.slider(key="tr_epochs_True").set_value(50)
        at.run()
    first.button(key="tr_start").click().run()
    assert metric(first, "Status") == "running"
    second.button(key="tr_start").click().run()
    assert any("Another session is training" in w.value for w in second.warning)
    assert not [m for m in second.metric if m.label == "Status" and m.value == "running"]
    first.button(key="tr_stop").click().run()
    deadline = time.time() + 120
    while metric(first, "Status") == "running" and time.time() < deadline:
        time.sleep(0.3)
        first.run()
    second.button(key="tr_start").click().run()  # the slot is free again
    assert metric(second, "Status") == "running"
    second.button(key="tr_stop").click().run()
    while metric(second, "Status") == "running" and time.time() < deadline:
        time.sleep(0.3)
        second.run()


def test_a_blank_upload_is_called_blank_and_a_large_linked_attack_waits_for_its_button():
    at = open_page("score")
    at.toggle(key="score_examples").set_value(False)
    white = io.BytesIO()
    Image.new("RGB", (1, 1), (255, 255, 255)).save(white, format="PNG")
    at.file_uploader(key="score_upload").set_value(("white.png", white.getvalue(), "image/png")).run()
    assert not at.exception and any(w.value.startswith("No visible content") for w in at.warning)

    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(HOME, default_timeout=TIMEOUT).run()
    at.switch_page("../pages/robustness.py")
    at.query_params["rb_refine"] = "1"
    at.query_params["rb_n"] = "300"
    at.run()
    assert not at.exception and not at.dataframe, "a link cannot start an attack larger than the default by itself"
    assert any("does not start by itself" in i.value for i in at.info)


def test_the_shared_result_cache_stays_within_its_megabytes_dropping_the_least_recently_used(monkeypatch):
    """Results are kept while their tensor data fits CACHE_MB; a new one drops the least recently used
    first, a hit refreshes a result's place, and one larger than the bound is returned but not kept."""
    import numpy as np
    import torch

    from app import compute

    monkeypatch.setattr(compute, "CACHE_MB", 3.0)
    s = compute._store()
    kept = dict(s["data"]), dict(s["bytes"])  # other tests' results, put back afterwards
    s["data"].clear()
    s["bytes"].clear()
    calls = []

    def mib():
        return torch.zeros(2**18)  # 1 MiB of float32

    def get(k, v):
        return compute.cached(("t", k), lambda p: (calls.append(k), v())[1], "test")

    try:
        get("a", lambda: {"x": mib(), "y": np.zeros(2**17)})  # 1 + 1 MiB (a dict of a tensor and an array)
        get("b", mib)
        assert compute.cache_stats() == {"entries": 2, "mb": 3.0}
        get("a", mib)  # a hit: not computed again, now the most recently used
        get("c", mib)  # 4 MiB would exceed 3: b (the least recently used) goes
        assert calls == ["a", "b", "c"] and compute.cache_stats() == {"entries": 2, "mb": 3.0}
        get("a", mib)
        get("b", mib)  # a kept; b recomputed, which drops c (a was used since)
        assert calls == ["a", "b", "c", "b"] and ("t", "a") in s["data"] and ("t", "c") not in s["data"]
        big = get("big", lambda: torch.zeros(2**20))  # 4 MiB: returned, not kept
        assert big.numel() == 2**20 and ("t", "big") not in s["data"]
        same = torch.zeros(2**18)
        assert compute.nbytes([same, same, {"k": same}]) == 2**20  # one object counted once
    finally:
        s["data"].clear()
        s["bytes"].clear()
        s["data"].update(kept[0])
        s["bytes"].update(kept[1])


def _gated(calls: list, gate, value=1):
    """A computation for the shared-job tests: records (worker slots busy, its thread's niceness), reports
    progress while it waits for ``gate``, returns ``value``."""
    import os
    import threading

    from app import compute

    def work(progress):
        calls.append((compute.workers_busy(), os.getpriority(os.PRIO_PROCESS, threading.get_native_id())))
        while not gate.wait(0.02):
            progress(0.5)
        progress(1.0)
        return value
    return work


def test_a_computation_asked_for_by_a_prefetch_and_a_visit_runs_once_and_the_visit_waits_for_it():
    """prefetch starts a job that runs niced without a worker slot; a prefetch or a visit (cached) asking for the
    same key meanwhile joins that job instead of computing again, and gets its value; once stored, a prefetch
    starts nothing."""
    import threading

    import torch

    from app import compute

    calls, gate = [], threading.Event()
    key = ("test-shared", id(calls))
    job = compute.prefetch(key, _gated(calls, gate, torch.arange(3)), "test")
    assert compute.prefetch(key, _gated(calls, gate), "test") is job
    while not calls:
        time.sleep(0.01)
    threading.Timer(0.3, gate.set).start()
    try:
        value = compute.cached(key, _gated(calls, gate), "test")
        assert torch.equal(value, torch.arange(3)) and len(calls) == 1
        busy, nice = calls[0]
        assert busy == 0
        if sys.platform.startswith("linux"):
            assert nice == min(19, compute._BASE_NICE + compute.BACKGROUND_NICE)
        assert compute.prefetch(key, _gated(calls, gate), "test") is None and len(calls) == 1
        assert key not in compute._jobs()["jobs"] and key not in compute._jobs()["wants"].values()
    finally:
        gate.set()
        compute._store()["data"].pop(key, None)
        compute._store()["bytes"].pop(key, None)


def test_work_ahead_of_visits_gives_way_to_arriving_visitors_until_a_visit_joins_it(monkeypatch):
    """note_arrival counts a session's first run only; a give_way prefetch begins once no visitor has arrived for
    ARRIVAL_QUIET_S seconds, pauses at its progress calls while one has just arrived, and goes on at once when a
    visit joins it; a give_way in_background thread begins after the same quiet."""
    import threading

    from app import compute

    quiet = 1.0
    monkeypatch.setattr(compute, "ARRIVAL_QUIET_S", quiet)
    tag = f"give-way-{id(monkeypatch)}"
    assert compute.note_arrival(f"{tag}-1") and not compute.note_arrival(f"{tag}-1")  # a rerun is no arrival
    assert not compute.note_arrival(None)
    assert compute.since_last_arrival() < quiet / 2
    assert compute.wait_for_quiet(lambda: False) < 0.1  # told to stop waiting: returns at once
    assert quiet / 2 < compute.wait_for_quiet() < quiet + 1.0 and compute.since_last_arrival() >= quiet
    assert compute.wait_for_quiet() < 0.1  # quiet already

    stamps, gate = [], threading.Event()

    def work(progress):
        while not gate.is_set():
            stamps.append(time.monotonic())
            progress(0.5)
            time.sleep(0.02)
        return 7

    key = (tag, "prefetch")
    try:
        compute.note_arrival(f"{tag}-2")
        arrived = time.monotonic()
        job = compute.prefetch(key, work, "test", give_way=True)
        assert job.give_way and not stamps
        deadline = time.monotonic() + 10
        while not stamps and time.monotonic() < deadline:
            time.sleep(0.01)
        assert stamps and stamps[0] - arrived >= quiet - 0.05, "it began while a visitor had just arrived"
        time.sleep(0.3)
        compute.note_arrival(f"{tag}-3")  # a visitor arrives while it runs: it pauses at its next progress call
        time.sleep(0.1)
        paused_at = len(stamps)
        time.sleep(quiet / 2)
        assert len(stamps) <= paused_at + 1, "it went on while a visitor had just arrived"
        compute.note_arrival(f"{tag}-4")
        compute._start(key, work, "test", background=False, who=(f"{tag}-4", "page"))  # a visit joins it
        time.sleep(quiet / 2)
        assert len(stamps) > paused_at + 5, "it still gave way with a visit waiting for it"
        gate.set()
        assert job.done.wait(10) and job.value == 7

        began = []
        compute.note_arrival(f"{tag}-5")
        arrived = time.monotonic()
        compute.in_background(tag, lambda: began.append(time.monotonic()), give_way=True).join(10)
        assert began and began[0] - arrived >= quiet - 0.05
    finally:
        gate.set()
        compute._store()["data"].pop(key, None)
        compute._store()["bytes"].pop(key, None)
        compute._background()["threads"].pop(tag, None)


def test_a_shared_computation_stops_when_no_connected_page_wants_it_and_keeps_nothing(monkeypatch):
    """A job runs while a connected session's page still asks for it: it stops (Abandoned, at its next progress
    call, worker slot freed, nothing stored) when that session's tab closes, or when the same page asks for
    another key (a changed setting); a page left for another page keeps its job."""
    import threading

    from app import compute

    alive = {"s1": True, "s2": True}
    monkeypatch.setattr(compute, "session_alive", lambda sid: alive.get(sid, True))
    gates = [threading.Event() for _ in range(4)]
    calls = [[] for _ in range(4)]
    keys = [("test-abandon", i, id(calls)) for i in range(4)]

    def start(i, who):
        _, job = compute._start(keys[i], _gated(calls[i], gates[i], i), "test", background=False, who=who)
        while not calls[i]:
            time.sleep(0.01)
        return job

    try:
        closed = start(0, ("s1", "likelihood"))
        assert compute.workers_busy() == 1 and calls[0][0][0] == 1  # it holds a worker slot
        alive["s1"] = False  # the tab closed
        assert closed.done.wait(10) and isinstance(closed.error, compute.Abandoned)
        assert compute.workers_busy() == 0
        assert keys[0] not in compute._store()["data"] and keys[0] not in compute._jobs()["jobs"]

        replaced = start(1, ("s2", "likelihood"))
        kept = start(2, ("s2", "calibration"))  # the session went to another page and computes there
        assert not replaced.done.wait(0.3)  # a page left for another keeps its job
        third = start(3, ("s2", "likelihood"))  # back on the first page with another setting: its old job stops
        assert replaced.done.wait(10) and isinstance(replaced.error, compute.Abandoned)
        assert not kept.done.is_set() and not third.done.is_set()
        gates[2].set()
        gates[3].set()
        assert kept.done.wait(10) and third.done.wait(10) and (kept.value, third.value) == (2, 3)
        assert compute._store()["data"][keys[3]] == 3 and compute.workers_busy() == 0
    finally:
        for g in gates:
            g.set()
        for k in keys:
            compute._store()["data"].pop(k, None)
            compute._store()["bytes"].pop(k, None)


def test_cancel_drops_the_page_from_its_computation_which_stops_when_nobody_else_wants_it():
    """The rerun caused by Cancel: the first computation the page asks for raises Cancelled and no longer counts
    that page as waiting, so a job only it wanted stops; a stored result asked for first is still returned."""
    import threading

    import streamlit as st

    from app import compute

    calls, gate = [], threading.Event()
    key, stored = ("test-cancel", id(calls)), ("test-cancel-stored", id(calls))
    compute._keep(stored, 7)
    _, job = compute._start(key, _gated(calls, gate), "test", background=False, who=compute._who())
    try:
        st.session_state[compute._CANCEL] = True
        assert compute.cached(stored, _gated(calls, gate), "test") == 7  # a hit does not take the mark
        with pytest.raises(compute.Cancelled):
            compute.cached(key, _gated(calls, gate), "test")
        assert job.done.wait(10) and isinstance(job.error, compute.Abandoned)
        assert key not in compute._store()["data"]
    finally:
        gate.set()
        st.session_state.pop(compute._CANCEL, None)
        for k in (key, stored):
            compute._store()["data"].pop(k, None)
            compute._store()["bytes"].pop(k, None)


def test_secondary_live_views_redraw_less_often_with_more_live_sessions_without_wavering():
    """live_interval: base x live sessions; a count that wavers by one does not change the interval in use, a
    large change does."""
    from app import compute

    assert compute.live_interval(1.0, 1) == 1.0 and compute.live_interval(1.0, 4) == 4.0
    assert compute.live_interval(1.0, 0) == 1.0
    assert compute.live_interval(1.0, 3, current=4.0) == 4.0  # 4 <-> 3 sessions: kept
    assert compute.live_interval(1.0, 4, current=3.0) == 3.0
    assert compute.live_interval(1.0, 1, current=4.0) == 1.0  # back to one session
    assert compute.live_interval(1.0, 4, current=1.0) == 4.0
    assert compute.live_interval(0.5, 7, current=2.0) == 3.5


def test_live_views_share_at_most_their_part_of_the_workers_and_forget_closed_sessions(monkeypatch):
    """live_share: alone or with one other session a live view keeps its full budget; four at once share
    LIVE_SHARE of the workers (each gets half at 0.5 x 2 workers / (4 x 0.5 duty)); a session that stopped
    ticking for LIVE_WINDOW_S no longer counts."""
    from app import compute

    monkeypatch.setattr(compute, "N_WORKERS", 2)
    monkeypatch.setattr(compute, "LIVE_SHARE", 0.5)
    state = compute._live()
    kept = dict(state["seen"])
    state["seen"].clear()
    try:
        assert compute.live_share("a", 0.5, now=100.0) == (1.0, 1)
        assert compute.live_share("b", 0.5, now=100.1) == (1.0, 2)
        compute.live_share("c", 0.5, now=100.2)
        factor, live = compute.live_share("d", 0.5, now=100.3)
        assert live == 4 and factor == pytest.approx(0.5)
        assert live * 0.5 * factor == pytest.approx(compute.LIVE_SHARE * compute.N_WORKERS)  # one core in all
        # a, b and c closed their tabs: 2.5 s later only d ticks on, with its full budget again
        assert compute.live_share("d", 0.5, now=102.8) == (1.0, 1)
    finally:
        state["seen"].clear()
        state["seen"].update(kept)


def test_live_views_refresh_less_often_with_more_sessions_live_all_together_at_a_bounded_rate(monkeypatch):
    """refresh_interval: alone or with one other session (8 refreshes/s in all) a view keeps its base interval;
    with more, all of them together refresh at most LIVE_REFRESHES_PER_S times per second: a longer interval is
    taken at once, a count that wavers down by one keeps the interval in use."""
    from app import compute

    monkeypatch.setattr(compute, "LIVE_REFRESHES_PER_S", 8.0)
    assert compute.refresh_interval(0.15, 1) == 0.15 and compute.refresh_interval(0.15, 0) == 0.15
    assert compute.refresh_interval(0.15, 2) == pytest.approx(0.25)
    assert compute.refresh_interval(0.15, 4) == pytest.approx(0.5)
    for live in (2, 4, 8):  # all sessions together: at most 8 refreshes per second
        assert live / compute.refresh_interval(0.15, live) <= 8.0 + 1e-9
    assert compute.refresh_interval(0.15, 3, current=0.5) == 0.5  # 4 -> 3 sessions: kept
    assert compute.refresh_interval(0.15, 4, current=0.375) == pytest.approx(0.5)  # 3 -> 4: longer at once
    assert compute.refresh_interval(0.15, 1, current=0.5) == 0.15  # back to one session
    with pytest.raises(ValueError, match="positive"):
        compute.refresh_interval(0.0, 1)


def test_a_link_number_that_is_not_a_whole_number_or_not_a_number_is_refused_with_the_reason():
    """share.number: an int setting refuses 1.5 (was silently cut to 1) and says why; text is 'not a number';
    the range is checked; a float setting takes any finite value in range."""
    from app import share

    chains = share.number(int, 1, 64)
    assert chains("16") == 16 and chains("16.0") == 16 and isinstance(chains("16.0"), int)
    for raw, why in [("1.5", "not a whole number"), ("abc", "not a number"), ("0", "outside"), ("inf", "outside"),
                     ("", "not a number")]:
        with pytest.raises(ValueError, match=why):
            chains(raw)
    assert share.number(float, 0.0, 2.0)("0.25") == 0.25


def test_with_four_sessions_live_the_chains_refresh_less_often_with_more_steps_each_and_say_so(monkeypatch):
    """Three other sessions' chains ticking: this session's chains refresh every 0.5 s instead of every 0.15 s,
    the caption says so, and each refresh holds as many more SGLD steps (the chains advance as fast)."""
    from app import compute, ui

    monkeypatch.setattr(compute, "N_WORKERS", 2)
    monkeypatch.setattr(compute, "LIVE_REFRESHES_PER_S", 8.0)
    state = compute._live()
    kept = dict(state["seen"])
    try:
        at = open_page("home")
        for name in ("other-1", "other-2", "other-3"):
            state["seen"][name] = time.monotonic() + 30  # still live while this test runs
        at.switch_page("../pages/langevin.py").run()
        assert not at.exception and metric(at, "Status") == "running"
        at.run()
        s = at.session_state["lg_live"]
        assert s["live"] == 4 and s["every"] == pytest.approx(max(ui.CHAIN_INTERVAL, 0.5))
        notes = [c.value for c in at.caption if "sessions run live chains" in c.value]
        assert notes and "4 sessions" in notes[0] and "refreshes every 0.5 s instead of every 0.15 s" in notes[0]
        assert any("one refresh every 0.5 s" in c.value for c in at.caption)
        # Steps per refresh fill this session's SGLD share (half of each interval, times its share) of the longer
        # interval: the chains advance as many steps per second as at 0.15 s (up to the floor of a whole step).
        fill = s["share"] * 0.5 * s["every"] / s["per_step"]
        assert s["k_auto"] in (1, 50) or abs(s["k_auto"] - fill) < 1, (s["k_auto"], fill)
    finally:
        state["seen"].clear()
        state["seen"].update(kept)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
def test_background_work_runs_once_per_server_at_lower_priority_outside_the_workers():
    """in_background: the first call with a name starts one daemon thread that runs at BACKGROUND_NICE more
    niceness and takes no worker slot (a live view must still find one); later calls with that name return the
    same thread and run nothing new."""
    import os
    import threading

    from app import compute

    seen = []

    def work():
        seen.append((compute.workers_busy(), os.getpriority(os.PRIO_PROCESS, threading.get_native_id()),
                     threading.current_thread().daemon))

    name = f"test-{id(seen)}"
    try:
        first = compute.in_background(name, work)
        again = compute.in_background(name, lambda: seen.append("again"))
        first.join(timeout=30)
        assert again is first and not first.is_alive()
        assert len(seen) == 1, seen
        busy, nice, daemon = seen[0]
        assert busy == 0 and daemon
        assert nice == os.getpriority(os.PRIO_PROCESS, 0) + compute.BACKGROUND_NICE or nice == 19
        # nice=0: work a visit may wait for inside a lock (an import) keeps the server's priority
        eager = compute.in_background(name + "-eager", work, nice=0)
        eager.join(timeout=30)
        assert seen[1][1] == os.getpriority(os.PRIO_PROCESS, 0)
    finally:
        compute._background()["threads"].pop(name, None)
        compute._background()["threads"].pop(name + "-eager", None)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread niceness is Linux's")
def test_a_visit_waiting_for_background_work_hurries_it(monkeypatch):
    """hurry: background work still giving way to arriving visitors begins at once at the server's priority; work
    already running niced goes back to the server's priority (where the system lets the process raise it)."""
    import os
    import threading

    from app import compute

    monkeypatch.setattr(compute, "ARRIVAL_QUIET_S", 60.0)
    compute.note_arrival(f"visitor-{id(monkeypatch)}")  # a visitor just arrived: give_way work waits a minute
    base = os.getpriority(os.PRIO_PROCESS, 0)
    began, running, release = [], threading.Event(), threading.Event()

    def nice_now() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def waiting_work():
        began.append(nice_now())

    def long_work():
        began.append(nice_now())
        running.set()
        release.wait(30)
        began.append(nice_now())

    names = [f"hurry-{id(began)}-{i}" for i in range(2)]
    try:
        waiting = compute.in_background(names[0], waiting_work, give_way=True)
        time.sleep(0.6)
        assert not began, "give_way work began although a visitor had just arrived"
        compute.hurry(names[0])
        waiting.join(timeout=10)
        assert began == [base]
        began.clear()
        niced = compute.in_background(names[1], long_work)
        assert running.wait(10) and began == [min(19, base + compute.BACKGROUND_NICE)]
        can_raise = os.geteuid() == 0
        compute.hurry(names[1])
        release.set()
        niced.join(timeout=10)
        assert began[1] == (base if can_raise else began[0])
        compute.hurry(names[1])  # finished: nothing happens
    finally:
        release.set()
        for name in names:
            compute._background()["threads"].pop(name, None)


def test_the_memory_keeper_hands_the_free_heap_back_on_its_interval(monkeypatch):
    """start_memory_keeper: off at interval 0; otherwise one daemon thread calling release_free_memory every
    interval (here 0.05 s, with the release counted instead of done) until its event is set."""
    import threading
    import time

    from app import compute

    calls = []  # only this keeper's: the server's own (every 10 s, started by the AppTests above) may fire meanwhile

    def release() -> bool:
        if threading.current_thread().name == "jem-memory-keeper-0.05s":
            calls.append(time.monotonic())
        return True

    monkeypatch.setattr(compute, "release_free_memory", release)
    assert compute.start_memory_keeper(0) is None
    stop = compute.start_memory_keeper(0.05)
    try:
        assert compute.start_memory_keeper(0.05) is stop  # once per server for a given interval
        keeper = [t for t in threading.enumerate() if t.name == "jem-memory-keeper-0.05s"]
        assert len(keeper) == 1 and keeper[0].daemon
        deadline = time.monotonic() + 10
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(calls) >= 3, calls
        assert min(b - a for a, b in zip(calls, calls[1:])) >= 0.04
    finally:
        stop.set()
    keeper[0].join(timeout=5)
    assert not keeper[0].is_alive()


def test_the_warm_up_computes_what_the_playground_and_likelihood_pages_open_with(monkeypatch):
    """The app's first run starts, in the background, the import of the pages' libraries (at the server's
    priority), the models' test probabilities of Home's and the Calibration page's first view (at once), and
    exactly the playground's pair (spec, seed, labels) and the Likelihood page's AIS estimate (model, test images,
    settings; at the server's priority, giving way to arriving visitors) that first visits ask for: the visits then
    compute none of them again. A bare call (no script run, e.g. a multiprocessing child re-importing
    the app) starts nothing."""
    import os
    import threading

    from streamlit.testing.v1 import AppTest

    import jem_core.evaluation
    import jem_core.likelihood
    from app import compute, registry

    threads = compute._background()["threads"]
    for thread in threads.values():  # an earlier test's warm-up, still running (or waiting for a quiet moment)
        thread.join(120)
    for job in [j for k, j in compute._jobs()["jobs"].items() if k[0] in ("likelihood", "proba")]:
        job.done.wait(120)
    calls, ais, imported, classified = [], [], [], []
    real, real_ais = registry.pretrained_pair, jem_core.likelihood.estimate_log_likelihood
    real_imports = registry._import_page_libraries
    monkeypatch.setattr(registry, "_import_page_libraries", lambda: (imported.append(
        os.getpriority(os.PRIO_PROCESS, threading.get_native_id())), real_imports())[1])
    monkeypatch.setattr(registry, "pretrained_pair", lambda *a, **k: (calls.append((a, k)), real(*a, **k))[1])
    monkeypatch.setattr(registry, "stored_toy_pair", lambda *a, **k: None)  # as with a pair that is not stored
    monkeypatch.setattr(jem_core.likelihood, "estimate_log_likelihood",
                        lambda *a, **k: (ais.append(k), real_ais(*a, **k))[1])
    real_proba = jem_core.evaluation.predict_proba
    monkeypatch.setattr(jem_core.evaluation, "predict_proba",
                        lambda model, x, **k: (classified.append(len(x)), real_proba(model, x, **k))[1])
    monkeypatch.setenv("JEM_EXPLORER_DEFAULT", "digits")
    registry.toy_pair.clear()
    store = compute._store()
    for k in [k for k in store["data"] if k[0] in ("likelihood", "proba")]:
        store["data"].pop(k)
        store["bytes"].pop(k, None)
    threads.pop("toy_pair", None)
    threads.pop("imports", None)
    registry._warmed.clear()
    monkeypatch.setattr(compute, "ARRIVAL_QUIET_S", 0.5)  # the pair and the estimate give way to a new visitor
    registry.warm_up(None)
    assert "toy_pair" not in threads, "a bare call started the warm-up"
    at = AppTest.from_file(HOME, default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    threads["toy_pair"].join(timeout=120)
    threads["imports"].join(timeout=120)  # the pages' libraries, at the server's own priority
    assert imported == [os.getpriority(os.PRIO_PROCESS, 0)]
    assert all(name in sys.modules for name in registry.PAGE_LIBRARIES)
    (job,) = registry._warmed("likelihood")
    assert job.background and job.nice == 0 and job.give_way and job.done.wait(120)
    # Home's first view (both models' test probabilities) was prefetched at once, and Home used it
    first_views = registry._warmed("probabilities")
    assert len(first_views) == 2 and all(j.background and j.nice == 0 and not j.give_way for j in first_views)
    assert classified == [first_views[0].key[-1]] * 2 and 0 < first_views[0].key[-1] <= registry.FIRST_VIEW_TEST_IMAGES
    assert len(calls) == 1 and calls[0][0][0] == registry.toy_spec()
    assert len(ais) == 1 and ais[0]["n_temps"] == registry.likelihood_temps(64)
    at.switch_page("../pages/playground.py").run()
    assert not at.exception, at.exception
    assert len(calls) == 1, "the playground's first view trained its pair again"
    assert at.session_state["pg_state"]["spec"] == registry.toy_spec()
    at.switch_page("../pages/calibration.py").run()
    assert not at.exception, at.exception
    assert len(classified) == 2, "the Calibration page's first view classified the test images again"
    at.switch_page("../pages/likelihood.py").run()  # waits for the warm-up's estimate if it is still running
    assert not at.exception and not errors(at), at.exception
    assert len(ais) == 1, "the Likelihood page's first view estimated log Z again"
    assert any(m.label == "log Ẑ (forward AIS)" for m in at.metric)
