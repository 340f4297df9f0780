"""Stored results: likelihood estimates, OOD score tables and trained 2-D pairs; the content address, the round
trip, bad files, and the first views stored with the app.

Claims: a report or a score table read back is the one saved, bit for bit, and a 2-D pair read back continues
exactly like the pair saved; the address changes with the weights, the images and every setting that changes the
result, and with nothing else; a file that is not a stored result is refused with our error; the Likelihood page's
first view of the bundled MNIST JEM, the OOD page's first view of the bundled MNIST pair and the playground's first
pair are stored for the code and weights in this repository, their figures are these models' (on these images),
and the pages read them without computing anything.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from jem_core.likelihood import LikelihoodError, estimate_log_likelihood, model_energy_fn
from jem_core.evaluation.ood import OOD_SCORES, load_ood_set, ood_score_table
from jem_core.report_store import (FORMAT, SCORES_FORMAT, TOY_FORMAT, StoredPair, StoreError, estimate_key,
                                   find_report, find_scores, find_toy_pair, load_report, load_scores, load_toy_pair,
                                   save_report, save_scores, save_toy_pair, scores_key, toy_pair_key)
from jem_core.toy import pretrained_pair

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (1, 3, 3)
SETTINGS = dict(shape=SHAPE, levels=17, n_temps=6, n_chains=4, data_chains=2, data_chain_steps=10)


def _tiny(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(9, 5), nn.Tanh(), nn.Linear(5, 3)).eval()


def _images(n: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def _same(a, b) -> None:
    """Bit-identical dataclass fields (a file round trip)."""
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if dataclasses.is_dataclass(x):
            _same(x, y)
        elif isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), f.name
        else:
            assert x == y, f.name


def test_a_stored_report_reads_back_bit_for_bit(tmp_path):
    model, x = _tiny(), _images()
    rep = estimate_log_likelihood(model, test_x=x, **SETTINGS)
    key = estimate_key(model, x, **SETTINGS)
    path = save_report(rep, tmp_path / "store", key)
    assert path == tmp_path / "store" / f"{key}.pt"
    back = find_report([tmp_path / "missing", tmp_path / "store"], key)
    assert back is not None and back.stored["key"] == key and back.stored["file"] == str(path)
    assert back.stored["torch"] == torch.__version__ and back.stored["computed"][:2] == "20"
    back.stored = {}
    _same(rep, back)
    assert back.summary() == rep.summary()
    assert find_report([tmp_path / "store"], "0" * 64) is None


def test_the_address_covers_weights_images_and_settings_and_nothing_else():
    model, x = _tiny(), _images()
    key = estimate_key(model, x, **SETTINGS)
    assert len(key) == 64 and int(key, 16) >= 0
    # the same question: defaults spelled out, a different batch size or device, a copy of the images
    assert estimate_key(_tiny(), x.clone(), **SETTINGS, n_leapfrog=5, boundary="reflect", seed=0) == key
    assert estimate_key(model, x, **SETTINGS, batch_size=2, device="cpu") == key
    # any change of what the estimate depends on
    changed = {estimate_key(model, x, **{**SETTINGS, **change}) for change in (
        {"n_temps": 7}, {"n_chains": 5}, {"sampler": "mala"}, {"schedule": "linear"}, {"reverse": False},
        {"seed": 1}, {"levels": 256}, {"sweep": [2]}, {"data_chain_steps": 11})}
    assert len(changed) == 9 and key not in changed
    edited = _tiny()
    with torch.no_grad():
        edited[1].bias[0] += 1e-6
    y = x.clone()
    y[0, 0, 0, 0] = -y[0, 0, 0, 0]
    others = {estimate_key(edited, x, **SETTINGS), estimate_key(model, y, **SETTINGS),
              estimate_key(model, x[:5], **SETTINGS), estimate_key(model, None, **SETTINGS)}
    assert len(others) == 4 and key not in others
    # every kind of state: BatchNorm's running statistics and its 0-dim int64 batch count
    bn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 3)).eval()
    bn_key = estimate_key(bn, x, **SETTINGS)
    bn[1].num_batches_tracked += 1
    assert estimate_key(bn, x, **SETTINGS) != bn_key


def test_bad_files_and_arguments_raise_our_error(tmp_path):
    model, x = _tiny(), _images()
    with pytest.raises(LikelihoodError, match="shape"):
        estimate_key(model, x, n_temps=4)
    with pytest.raises(LikelihoodError, match="keywords of estimate_log_likelihood"):
        estimate_key(model, x, shape=SHAPE, temperatures=4)
    with pytest.raises(LikelihoodError, match="nn.Module"):
        estimate_key(model_energy_fn(model), x, shape=SHAPE)
    rep = estimate_log_likelihood(model, test_x=x, **SETTINGS)
    with pytest.raises(LikelihoodError, match="64 lowercase hex"):
        save_report(rep, tmp_path, "../escape")
    torch.save({"state_dict": model.state_dict()}, tmp_path / "ckpt.pt")
    with pytest.raises(LikelihoodError, match=FORMAT):
        load_report(tmp_path / "ckpt.pt")
    (tmp_path / "text.pt").write_text("not a report")
    with pytest.raises(LikelihoodError, match="stored report"):
        load_report(tmp_path / "text.pt")
    key = estimate_key(model, x, **SETTINGS)
    torch.save({"format": FORMAT, "report": {"forward": None}}, tmp_path / f"{key}.pt")
    with pytest.raises(LikelihoodError, match="compute it again"):
        find_report([tmp_path], key)


def _mnist_first_view():
    """The bundled MNIST JEM, the Likelihood page's first-view settings and its test images (the demo pack's
    MNIST test split, the same images as the full data root's)."""
    from app import registry
    from jem_core.checkpoint import load_checkpoint
    from jem_core.data import load_dataset
    from jem_core.likelihood import pixel_levels

    path = ROOT / "checkpoints" / "mnist_jem.pt"
    if not path.is_file():
        pytest.skip("the bundled MNIST JEM is not in checkpoints/")
    ck = load_checkpoint(path)
    shape = registry.shape_of(ck)
    x = load_dataset("mnist", "test", None, download=False, channels=shape[0], size=shape[1]).x
    x = x[:min(len(x), registry.LIKELIHOOD_TEST_IMAGES)]
    settings = dict(shape=shape, levels=pixel_levels("mnist"), n_temps=registry.likelihood_temps(math.prod(shape)),
                    n_chains=registry.LIKELIHOOD_CHAINS, sampler=registry.LIKELIHOOD_SAMPLER,
                    schedule=registry.LIKELIHOOD_SCHEDULE, reverse=registry.LIKELIHOOD_REVERSE)
    return ck, x, settings


def test_the_bundled_mnist_first_view_is_stored_for_this_code_and_these_weights():
    """Fails after a change of the estimator, the energy, the model code, the weights or the first view's
    settings: store the estimate again with the command in ``checkpoints/README.md``."""
    from app import registry

    ck, x, settings = _mnist_first_view()
    rep = registry.stored_likelihood(ck.model, x, settings)
    assert rep is not None, "no stored estimate for the Likelihood page's first view of checkpoints/mnist_jem.pt"
    s = rep.summary()
    assert s["temps"] == settings["n_temps"] and s["chains"] == settings["n_chains"] and s["test_images"] == len(x)
    # Its figures are this model's on these images: log p(x) = -E(x) - log Ẑ, recomputed here.
    with torch.no_grad():
        energy = model_energy_fn(ck.model)(x).double()
    assert torch.allclose(rep.test_energy, energy, rtol=1e-4, atol=1e-3)
    assert torch.allclose(rep.test_log_px, -energy - rep.forward.log_z, rtol=1e-4, atol=1e-3)
    assert math.isfinite(s["log_z"]) and s["log_z_se"] > 0 and s["agree"] is not None
    stored = sorted(p.name for p in registry.STORED_LIKELIHOOD.iterdir())
    assert stored == [Path(rep.stored["file"]).name], f"stale stored estimates in {registry.STORED_LIKELIHOOD}"


def _open_without_computing(monkeypatch, page: str, cache_kind: str, module, function: str, allow=None):
    """Open ``pages/<page>.py`` on the bundled MNIST pair in AppTest, with no result of ``cache_kind`` in the
    shared result store and ``module.function`` replaced by a recorder; the app test and the recorded calls.
    ``allow(*args, **kwargs)``: calls for which it is true run the real function and are not recorded."""
    from streamlit.testing.v1 import AppTest

    from app import compute

    monkeypatch.setenv("JEM_EXPLORER_DEFAULT", "mnist")
    monkeypatch.setenv("JEM_WARM_UP", "0")
    store = compute._store()
    with store["lock"]:
        for k in [k for k in store["data"] if k[0] == cache_kind]:
            store["data"].pop(k)
            store["bytes"].pop(k, None)
        store["not_stored"].clear()
    called, real = [], getattr(module, function)
    monkeypatch.setattr(module, function,
                        lambda *a, **k: real(*a, **k) if allow is not None and allow(*a, **k) else called.append(k))
    at = AppTest.from_file(str(ROOT / "app" / "Home.py"), default_timeout=180).run()
    at.switch_page(f"../pages/{page}.py").run()
    assert not at.exception, at.exception
    assert not [e.value for e in at.error]
    return at, called


def test_the_likelihood_page_reads_the_stored_estimate_without_estimating(monkeypatch):
    import jem_core.likelihood

    _mnist_first_view()  # skips without the bundled model
    at, called = _open_without_computing(monkeypatch, "likelihood", "likelihood", jem_core.likelihood,
                                         "estimate_log_likelihood")
    assert called == [], "the page estimated log Z although the estimate is stored"
    values = {m.label: m.value for m in at.metric}
    assert "log Ẑ (forward AIS)" in values and "Test bits/dim" in values
    assert any("Read from a stored estimate" in c.value for c in at.caption)


def test_the_cli_stores_the_report_under_the_address_the_app_looks_up(tmp_path, capsys):
    """``python -m jem_core likelihood ... --store FOLDER`` writes ``FOLDER/<key>.pt``, the key of the same question
    asked the app's way (:func:`app.registry.stored_likelihood`), and the file holds the figures it printed."""
    import json

    from app import registry
    from jem_core.checkpoint import load_checkpoint
    from jem_core.cli import main
    from jem_core.data import load_dataset

    path = ROOT / "checkpoints" / "digits_jem.pt"
    if not path.is_file():
        pytest.skip("the bundled digits checkpoints are not in checkpoints/")
    assert main(["likelihood", "--checkpoint", str(path), "--n-test", "20", "--temps", "6", "--chains", "4",
                 "--quiet", "--store", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    ck = load_checkpoint(path)
    x = load_dataset("digits", "test", None, download=False).x[:20]
    settings = dict(shape=registry.shape_of(ck), levels=17, n_temps=6, n_chains=4, sampler="hmc",
                    schedule="sigmoid", reverse=True)
    rep = registry.stored_likelihood(ck.model, x, settings, folder=tmp_path)
    assert rep is not None and out["stored"] == rep.stored["file"]
    assert rep.summary()["log_z"] == out["log_z"] and rep.summary()["test_images"] == 20


# ------------------------------------------------------------------------------------------- OOD scores
def _image_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(9, 4)).eval()


def test_a_stored_score_table_reads_back_bit_for_bit_under_its_address(tmp_path):
    model, x = _image_model(), _images()
    table = ood_score_table(model, x)
    key = scores_key(model, x)
    assert len(key) == 64 and scores_key(_image_model(), x.clone()) == key
    path = save_scores(table, tmp_path / "store", key)
    back = find_scores([tmp_path / "missing", tmp_path / "store"], key)
    assert back is not None and back.stored["key"] == key and back.stored["file"] == str(path)
    assert set(back) == set(OOD_SCORES) and all(torch.equal(back[k], table[k]) for k in OOD_SCORES)
    assert find_scores([tmp_path / "store"], "0" * 64) is None
    # other weights, other images, an estimate's address: none is this table's
    edited = _image_model()
    with torch.no_grad():
        edited[1].bias[0] += 1e-6
    y = x.clone()
    y[0, 0, 0, 0] = -y[0, 0, 0, 0]
    others = {scores_key(edited, x), scores_key(model, y), scores_key(model, x[:5]),
              estimate_key(model, x, **SETTINGS)}
    assert len(others) == 4 and key not in others


def test_bad_score_tables_and_files_raise_our_error(tmp_path):
    model, x = _image_model(), _images()
    key = scores_key(model, x)
    with pytest.raises(StoreError, match="nn.Module"):
        scores_key(model_energy_fn(model), x)
    with pytest.raises(StoreError, match=r"\[N, C, H, W\]"):
        scores_key(model, x[0])
    with pytest.raises(StoreError, match="64 lowercase hex"):
        save_scores(ood_score_table(model, x), tmp_path, "../escape")
    with pytest.raises(StoreError, match="maps names"):
        save_scores({"energy": torch.zeros(6)}, tmp_path, key)
    with pytest.raises(StoreError, match="one length"):
        save_scores({"log_px": torch.zeros(6), "max_prob": torch.zeros(5)}, tmp_path, key)
    rep = estimate_log_likelihood(_tiny(), test_x=x, **SETTINGS)
    other = save_report(rep, tmp_path, key)  # a likelihood report where a score table is looked for
    with pytest.raises(StoreError, match=SCORES_FORMAT):
        load_scores(other)
    (tmp_path / "text.pt").write_text("not a table")
    with pytest.raises(StoreError, match="stored scores"):
        load_scores(tmp_path / "text.pt")


def test_evaluate_stores_every_score_table_where_the_app_looks_it_up(tmp_path, capsys):
    """``python -m jem_core evaluate ... --store FOLDER`` writes the in-distribution images' table and each OOD
    set's, under the addresses :func:`app.registry.stored_ood_scores` looks up for the same images."""
    import json

    from app import registry
    from jem_core.checkpoint import load_checkpoint
    from jem_core.cli import main
    from jem_core.data import load_dataset

    path = ROOT / "checkpoints" / "digits_jem.pt"
    if not path.is_file():
        pytest.skip("the bundled digits checkpoints are not in checkpoints/")
    assert main(["evaluate", "--checkpoint", str(path), "--n-test", "40", "--n-calib", "0", "--n-ood", "20",
                 "--ood", "uniform", "inverted", "--skip", "robustness", "samples", "--quiet",
                 "--out", str(tmp_path / "out"), "--store", str(tmp_path / "store")]) == 0
    capsys.readouterr()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert len(report["ood_stored"]) == 3 and len(list((tmp_path / "store").iterdir())) == 3
    model = load_checkpoint(path).model
    x_in = load_dataset("digits", "test", None, download=False).x[:20]
    for i, x in enumerate([x_in] + [load_ood_set(s, x_in, None, n=20, seed=i) for i, s in enumerate(["uniform", "inverted"])]):
        stored = registry.stored_ood_scores(model, x, OOD_SCORES, folder=tmp_path / "store")
        assert stored is not None and stored.stored["file"] == report["ood_stored"][i]
        fresh = ood_score_table(model, x)
        assert all(torch.allclose(stored[k], fresh[k], rtol=1e-5, atol=1e-5) for k in OOD_SCORES)
    only = registry.stored_ood_scores(model, x_in, ("max_prob",), folder=tmp_path / "store")
    assert list(only) == ["max_prob"] and only.stored["file"] == report["ood_stored"][0]


def _mnist_ood_first_view():
    """The bundled MNIST pair and the stored first views of it: the OOD page's (the first 500 test images and 500
    images of each default OOD set, made as the page makes them) and the Score page's reference (the first
    ``SCORE_REFERENCE_IMAGES`` test images); the demo pack's images, the same as the data root's."""
    from app import registry
    from jem_core.checkpoint import load_checkpoint
    from jem_core.data import load_dataset
    from jem_core.evaluation.report import default_ood_sets

    paths = [ROOT / "checkpoints" / f"mnist_{m}.pt" for m in ("jem", "baseline")]
    if not all(p.is_file() for p in paths):
        pytest.skip("the bundled MNIST pair is not in checkpoints/")
    test_x = load_dataset("mnist", "test", None, download=False).x
    x_in = test_x[:500]
    sets = {s: load_ood_set(s, x_in, None, n=500, seed=i) for i, s in enumerate(default_ood_sets("mnist", None))}
    return ([load_checkpoint(p).model for p in paths],
            {"in-distribution": x_in, **sets, "score reference": test_x[:registry.SCORE_REFERENCE_IMAGES]})


def test_the_bundled_mnist_ood_first_view_is_stored_for_this_code_and_these_weights():
    """Fails after a change of the scores, the energy, the model code, the weights or the page's first view:
    store the tables again with the command in ``checkpoints/README.md``."""
    from app import registry

    models, images = _mnist_ood_first_view()
    assert "fashion_mnist" in images
    files = set()
    for model in models:
        for name, x in images.items():
            stored = registry.stored_ood_scores(model, x, OOD_SCORES)
            assert stored is not None, f"no stored OOD scores of {name} for the OOD and Score pages' first views"
            files.add(Path(stored.stored["file"]).name)
    # their figures are these models' on these images (three tables recomputed here)
    for model, name in ((models[0], "in-distribution"), (models[1], "fashion_mnist"), (models[0], "score reference")):
        stored, fresh = registry.stored_ood_scores(model, images[name], OOD_SCORES), ood_score_table(model, images[name])
        # rtol 5e-3: another CPU's kernels round differently; the input-gradient norm of a confident image (a
        # small difference of large terms) differed by up to 1.1e-3 relative between two machines of this project
        assert all(torch.allclose(stored[k], fresh[k], rtol=5e-3, atol=1e-4) for k in OOD_SCORES)
    assert sorted(p.name for p in registry.STORED_OOD.iterdir()) == sorted(files), \
        f"stale stored score tables in {registry.STORED_OOD}"


def test_the_ood_page_reads_the_stored_tables_without_scoring(monkeypatch):
    import jem_core.evaluation

    _mnist_ood_first_view()  # skips without the bundled pair
    at, called = _open_without_computing(monkeypatch, "ood", "ood", jem_core.evaluation, "ood_score_table")
    assert called == [], "the page scored images although their scores are stored"
    assert any(c.value.startswith("14 of these 14 score tables were read from stored tables") for c in at.caption)
    assert len(at.dataframe) >= 2


def test_the_score_page_reads_its_stored_reference_without_scoring_the_test_images(monkeypatch):
    import jem_core.evaluation
    from app import registry

    _mnist_ood_first_view()  # skips without the bundled pair
    # the page still scores each shown image itself (one image per call): only larger calls are recorded
    at, called = _open_without_computing(monkeypatch, "score", "score_ref", jem_core.evaluation, "ood_score_table",
                                         allow=lambda model, x, *a, **k: len(x) == 1)
    assert called == [], "the page scored the test images although their scores are stored"
    notes = [c.value for c in at.caption if c.value.startswith("The test images' scores were read from a stored table")]
    assert notes and all(f"`{registry.CHECKPOINT_DIR.name}/{registry.STORED_OOD.name}/" in n for n in notes)
    # every example's verdict is placed on the 1,000 test images' histograms
    assert len(at.dataframe) >= 3 and any(f"among {registry.SCORE_REFERENCE_IMAGES} mnist test images" in
                                          str(getattr(e, "proto", "")) for e in at.get("plotly_chart"))


# ------------------------------------------------------------------------------------------- 2-D pairs
SMALL_SPEC = "toy:moons?noise=0.08&n=400"


def test_a_stored_toy_pair_reads_back_and_continues_exactly_like_the_pair_saved(tmp_path):
    pair = pretrained_pair(SMALL_SPEC, 0, 20, measure_every=10)
    key = toy_pair_key(SMALL_SPEC, 0, 20, measure_every=10)
    path = save_toy_pair(pair, tmp_path / "store", key)
    assert path == tmp_path / "store" / f"{key}.pt"
    back = find_toy_pair([tmp_path / "missing", tmp_path / "store"], key)
    assert isinstance(back, StoredPair) and back.stored["key"] == key and back.stored["file"] == str(path)
    assert back.stored["torch"] == torch.__version__
    for saved, read in zip(pair, back):
        # repr: exact for floats, and nan (no gap before the first samples) equals itself
        assert (read.objective, read.iteration, repr(read.history)) == (saved.objective, 20, repr(saved.history))
        # the same state, bit for bit (a file round trip), then the same training steps from it
        for t in (saved, read):
            t.train(3)
        for (name, a), b in zip(saved.trainer.model.state_dict().items(), read.trainer.model.state_dict().values()):
            assert torch.equal(a, b), name
        assert torch.equal(saved.chains, read.chains) and read.iteration == 23
    assert find_toy_pair([tmp_path / "store"], "0" * 64) is None


def test_the_toy_pair_address_covers_its_recipe():
    base = toy_pair_key(SMALL_SPEC, 0, 20)
    assert toy_pair_key(SMALL_SPEC, 0, 20, None, 25) == base and len(base) == 64
    others = {toy_pair_key("toy:moons?noise=0.1&n=400", 0, 20), toy_pair_key(SMALL_SPEC, 1, 20),
              toy_pair_key(SMALL_SPEC, 0, 21), toy_pair_key(SMALL_SPEC, 0, 20, 5),
              toy_pair_key(SMALL_SPEC, 0, 20, measure_every=10)}
    assert len(others) == 5 and base not in others


def test_bad_toy_pairs_and_files_raise_our_error(tmp_path):
    with pytest.raises(StoreError, match="spec as a string"):
        toy_pair_key(None, 0, 20)
    with pytest.raises(StoreError, match="seed must be"):
        toy_pair_key(SMALL_SPEC, -1, 20)
    with pytest.raises(StoreError, match="measure_every"):
        toy_pair_key(SMALL_SPEC, 0, 20, measure_every=0)
    pair = pretrained_pair(SMALL_SPEC, 0, 0)
    key = toy_pair_key(SMALL_SPEC, 0, 0)
    with pytest.raises(StoreError, match="64 lowercase hex"):
        save_toy_pair(pair, tmp_path, "../escape")
    with pytest.raises(StoreError, match=r"\(jem, baseline\)"):
        save_toy_pair((pair[1], pair[0]), tmp_path, key)
    table = save_scores({"max_prob": torch.zeros(3)}, tmp_path, key)  # a score table where a pair is looked for
    with pytest.raises(StoreError, match=TOY_FORMAT):
        load_toy_pair(table)
    (tmp_path / "text.pt").write_text("not a pair")
    with pytest.raises(StoreError, match="stored pair"):
        load_toy_pair(tmp_path / "text.pt")


def test_the_playground_first_pair_is_stored_for_this_code():
    """Fails after a change of the 2-D trainer, the training loop or what it trains with: store the pair again with
    the command in ``checkpoints/README.md``."""
    from app import registry

    pair = registry.stored_toy_pair(*registry.first_toy_pair())
    assert pair is not None, "no stored pair for the playground's first view in checkpoints/toy"
    for t in pair:
        assert t.iteration == registry.TOY_PRETRAIN_ITERS and not t.diverged and t.dataset == registry.toy_spec()
        # its figures are this pair's: measuring the stored model again gives the history's last row
        last = dict(t.history[-1])
        row, _ = t.measure()
        for k in ("ece", "test_log_px", "log_z"):  # tolerances: another CPU's float rounding
            assert math.isclose(row[k], last[k], rel_tol=1e-4, abs_tol=1e-4), k
        assert abs(row["accuracy"] - last["accuracy"]) <= 2 / len(t.trainer.test_set), "more than 2 points changed"
    assert sorted(p.name for p in registry.STORED_TOY.iterdir()) == [Path(pair.stored["file"]).name], \
        f"stale stored pairs in {registry.STORED_TOY}"


def test_the_playground_opens_on_the_stored_pair_without_training(monkeypatch):
    from streamlit.testing.v1 import AppTest

    from app import registry

    monkeypatch.setenv("JEM_WARM_UP", "0")
    registry.toy_pair.clear()
    calls = []
    monkeypatch.setattr(registry, "pretrained_pair", lambda *a, **k: calls.append(a))
    at = AppTest.from_file(str(ROOT / "app" / "Home.py"), default_timeout=180).run()
    at.switch_page("../pages/playground.py").run()
    assert not at.exception, at.exception
    assert calls == [], "the playground trained its first pair although it is stored"
    assert at.session_state["pg_state"]["jem"].iteration == registry.TOY_PRETRAIN_ITERS
    assert any("were read from a stored file" in c.value for c in at.caption)
    registry.toy_pair.clear()
