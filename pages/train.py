"""Train: a JEM, a baseline or a semi-supervised JEM in a background thread, with live loss, accuracy and
E(data) - E(samples) curves, a refreshing sample grid, divergence-recovery events and a Stop button.
A named recipe (jem_core.recipes) or custom settings; a validation split judged every epoch (accuracy,
ECE, buffer-sample quality) with drift events marked on the curves; a time estimate from a few timed
iterations before a run. The result (the epoch chosen on validation) joins the model picker (this session
only) with its accuracy in the label, and can be downloaded or saved into a folder.

Widgets -> :class:`jem_core.training.Trainer` (``fit`` in a ``threading.Thread``, ``request_stop``) ->
plotly curves of what its callbacks recorded. Each run writes into its own temporary folder
(:mod:`app.runs`), deleted once nothing can use it.

What does not live here: the training loop and its guards (:mod:`jem_core.training`), the run folders
(:mod:`app.runs`).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import threading
import time
from pathlib import Path

import pandas as pd
import streamlit as st

from app import runs, ui
from jem_core.data import BUILTIN_DATASETS, DataUnavailableError, data_available, download_dataset
from jem_core.recipes import RECIPES, recipe_config
from jem_core.training import TrainConfig, Trainer, TrainingDiverged, resolve_judge

RUN = ui.TRAIN_RUN  # session_state: the current (or last) training run
OBJECTIVES = {"jem": "JEM", "baseline": "Baseline (cross-entropy)", "semi": "Semi-supervised JEM"}
MAX_POINTS = 1500  # points per curve drawn
MAX_ITERATIONS_KEPT = 4000  # per-iteration statistics kept per run (the older half is thinned past it)
MAX_TRAINING_RUNS = 1  # training runs at once in this server (each holds a core for as long as it trains)
BUSY = "tr_busy"  # session_state: a Start click found every training slot taken


@st.cache_resource
def _training_slots() -> threading.BoundedSemaphore:
    """Training runs at once in this server, across sessions: one per spare core (one on 2 cores)."""
    return threading.BoundedSemaphore(MAX_TRAINING_RUNS)


def on_iteration(run: dict, stats: dict) -> None:
    """Called by the trainer after each iteration (in its thread): keep the curve bounded, and stop when the
    browser session that started the run is gone, unless the user asked the run to go on without it."""
    its = run["iterations"]
    its.append(stats)
    if len(its) > MAX_ITERATIONS_KEPT:  # thin the older half: memory stays bounded, the recent past is exact
        half = len(its) // 2
        its[:half] = its[:half:2]
    if len(its) % 25 == 0 and not run["keep"] and not ui.session_alive(run["session"]):
        run["stop_reason"] = "its browser tab was closed (turn on **Keep training** to let a run outlive its tab)"
        if run["trainer"] is not None:
            run["trainer"].request_stop()


def train_worker(run: dict, cfg: TrainConfig, out: Path, folders: runs.RunFolders) -> None:
    """Runs in the background thread: never touches Streamlit, only the ``run`` dict. Holds one of the server's
    training slots (taken by :func:`start`) until it ends; then tells ``folders`` that the run's folder holds
    only what the page still reads (:meth:`app.runs.RunFolders.ended`)."""
    try:
        trainer = Trainer(cfg, out=out, on_iteration=lambda stats: on_iteration(run, stats),
                          on_epoch=lambda m: run["epochs"].append(dataclasses.asdict(m)), log=run["log"].append)
        run["trainer"] = trainer
        if run["stop"]:
            trainer.request_stop()
        trainer.fit()
        if trainer.iteration > 0:  # the latest state, also after a stop in the middle of an epoch; with a
            # validation split the checkpoint keeps the epoch chosen on validation (only the resume state moves)
            trainer.save(out, write_checkpoint=trainer.val_set is None or trainer.best is None)
        run["status"] = "stopped" if trainer.stopped else "finished"
    except TrainingDiverged as e:
        run["status"], run["error"] = "diverged", str(e)
    except Exception as e:  # noqa: BLE001 - reported in the page
        run["status"], run["error"] = "error", f"{type(e).__name__}: {e}"
    finally:
        run["ended"] = time.time()
        folders.ended(out.parent, out)
        _training_slots().release()


def datasets(root: Path) -> list[str]:
    return ["digits"] + [d for d in BUILTIN_DATASETS if d != "digits" and data_available(d, root, "train")]


def settings(ctx: ui.Context, disabled: bool) -> tuple[TrainConfig, str]:
    ss = st.session_state
    a, b, c, d = st.columns(4)
    dataset = a.selectbox("Dataset", datasets(ctx.data_root), key="tr_dataset", disabled=disabled, **ui.PERSIST)
    recipes = ["custom"] + [n for n, r in RECIPES.items() if r["settings"]["dataset"] == dataset]
    recipe = a.selectbox("Recipe", recipes, key=f"tr_recipe_{dataset}", disabled=disabled,
                         help="a named recipe from jem_core.recipes (schedules, validation split, drift guard); "
                              "the settings below are then not used", **ui.PERSIST)
    objective = b.radio("Objective", list(OBJECTIVES), format_func=OBJECTIVES.get, key="tr_objective",
                        disabled=disabled, **ui.PERSIST)
    labels = b.number_input("Labels per class", 1, 1000, 10, key="tr_labels", disabled=disabled or objective != "semi",
                            help="semi-supervised: cross-entropy sees this many labelled images per class, the p(x) "
                                 "term sees all", **ui.PERSIST)
    small = dataset == "digits"
    epochs = c.slider("Epochs", 1, 50, 10 if small else 1, key=f"tr_epochs_{small}", disabled=disabled, **ui.PERSIST)
    cap = c.number_input("Iterations per epoch (0 = a full pass)", 0, 100_000, 0, key="tr_max_iters",
                         disabled=disabled, **ui.PERSIST)
    lr = d.select_slider("Learning rate", [1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3], value=1e-3 if small else 1e-4,
                         key=f"tr_lr_{small}", disabled=disabled, **ui.PERSIST)
    batch = d.select_slider("Batch size", [16, 32, 64, 128, 256], value=64, key="tr_batch", disabled=disabled,
                            **ui.PERSIST)
    jem = objective != "baseline"
    with st.expander("SGLD and stabilisers", expanded=jem):
        e, f, g, h, i = st.columns(5)
        steps = e.slider("SGLD steps per iteration", 1, 40, 10 if small else 5, key=f"tr_sgld_steps_{small}",
                         disabled=disabled or not jem, **ui.PERSIST)
        step_size = f.select_slider("SGLD step size", [0.01, 0.1, 0.3, 1.0, 2.0], value=1.0, key="tr_sgld_step",
                                    disabled=disabled or not jem, **ui.PERSIST)
        noise = g.select_slider("SGLD noise std", [0.0, 0.001, 0.005, 0.01, 0.02, 0.05], value=0.01,
                                key="tr_sgld_noise", disabled=disabled or not jem, **ui.PERSIST)
        max_update = h.select_slider("Max update per pixel", ["off", 0.01, 0.02, 0.05, 0.1],
                                     value="off" if small else 0.05, key=f"tr_max_update_{small}",
                                     disabled=disabled or not jem, **ui.PERSIST)
        l2 = i.select_slider("Energy L2 penalty", [0.0, 0.001, 0.01, 0.1], value=0.0 if small else 0.01,
                             key=f"tr_l2_{small}", disabled=disabled or not jem, **ui.PERSIST)
        buf = e.select_slider("Replay buffer size", [500, 1000, 2000, 5000, 10000], value=2000 if small else 10000,
                              key=f"tr_buffer_{small}", disabled=disabled or not jem, **ui.PERSIST)
        reinit = f.select_slider("Reinit frequency", [0.0, 0.01, 0.05, 0.1, 0.2], value=0.05, key="tr_reinit",
                                 disabled=disabled or not jem, **ui.PERSIST)
        seed = g.number_input("Seed", 0, 10_000, 0, key="tr_seed", disabled=disabled, **ui.PERSIST)
    run = ss.get(RUN)
    n_runs = ss.get("tr_count", 0) + (0 if disabled else 1)  # while a run trains, its own number
    name = st.text_input("Run name", value=run["name"] if disabled and run else
                         f"run{n_runs}_{dataset}_{objective if recipe == 'custom' else recipe}",
                         key=f"tr_name_{n_runs}", disabled=disabled)
    with st.expander("Validation and drift guard", expanded=False):
        v1, v2, v3 = st.columns(3)
        n_val = v1.number_input("Validation images (last of the training split; 0 = none)", 0, 10_000,
                                300 if small else 5000, key=f"tr_val_{small}", disabled=disabled, **ui.PERSIST)
        drift = v2.checkbox("Drift guard", value=True, key="tr_drift", disabled=disabled or not jem,
                            help="watch E(data) - E(samples), E(data), logit and gradient growth; on a drift roll "
                                 "back to before it began and lower the rate / raise the energy penalty", **ui.PERSIST)
        px_sched = v3.text_input("p(x) weight schedule (EPOCH:VALUE,...; empty = 1 throughout)", "",
                                 key="tr_px_sched", disabled=disabled or not jem, **ui.PERSIST)
    judge = f"bundled:{dataset}_baseline.pt"
    judge = judge if resolve_judge(judge) is not None else None
    if recipe != "custom":
        cfg = recipe_config(recipe, data_root=str(ctx.data_root), device="cpu", seed=int(seed),
                            max_iters_per_epoch=int(cap) or None)
        st.caption(f"Recipe **{recipe}**: {RECIPES[recipe]['description']}. Settings: "
                   + ", ".join(f"{k}={v}" for k, v in RECIPES[recipe]["settings"].items()))
        return cfg, "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name.strip()) or f"run{n_runs}"
    cfg = TrainConfig(dataset=dataset, objective="baseline" if objective == "baseline" else "jem", epochs=int(epochs),
                      batch_size=int(batch), lr=float(lr), warmup_iters=100 if small else 500, sgld_steps=int(steps),
                      sgld_step_size=float(step_size), sgld_noise=float(noise),
                      sgld_max_update=None if max_update == "off" else float(max_update), energy_l2=float(l2),
                      buffer_size=int(buf), reinit_freq=float(reinit), crop_padding=1 if small else -1,
                      labels_per_class=int(labels) if objective == "semi" else None, seed=int(seed),
                      data_root=str(ctx.data_root), max_iters_per_epoch=int(cap) or None, device="cpu",
                      keep_buffer=400, n_reference=2000, val_split=int(n_val), drift_guard=bool(drift and jem),
                      px_weight_schedule=px_sched.strip() if jem else "", lr_schedule="cosine", lr_floor=0.1,
                      sample_eval=(300 if small else 500) if n_val and jem else 0, judge=judge,
                      ais_temps=50 if n_val and jem else 0, guard_every=10 if small else 50)
    return cfg, "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name.strip()) or f"run{n_runs}"


def start(cfg: TrainConfig, name: str) -> None:
    ss = st.session_state
    if not _training_slots().acquire(blocking=False):
        ss[BUSY] = True  # the page says why nothing started
        return
    ss.pop(BUSY, None)
    ss["tr_count"] = ss.get("tr_count", 0) + 1
    folders = runs.run_folders()
    folders.sweep()
    try:
        out = folders.new(ui.current_session_id()) / f"{name}.pt"
    except OSError:
        _training_slots().release()
        raise
    run = {"name": name, "config": dataclasses.asdict(cfg), "out": str(out), "status": "running", "stop": False,
           "iterations": [], "epochs": [], "log": [], "trainer": None, "error": None, "started": time.time(),
           "ended": None, "registered": False, "session": ui.current_session_id(),
           "keep": bool(ss.get("tr_keep", False)), "stop_reason": None}
    run["thread"] = threading.Thread(target=train_worker, args=(run, cfg, out, folders), daemon=True,
                                     name=f"train-{name}")
    ss[RUN] = run
    run["thread"].start()


def stop() -> None:
    run = st.session_state.get(RUN)
    if run is not None:
        run["stop"] = True
        if run["trainer"] is not None:
            run["trainer"].request_stop()


def thin(rows: list) -> list:
    return rows[:: max(1, len(rows) // MAX_POINTS)]


def curves(run: dict) -> None:
    its = thin(list(run["iterations"]))
    epochs = list(run["epochs"])
    if not its:
        st.info("Loading data and building the model..." if run["status"] == "running" else "No iteration ran.")
        return
    x = [r["iteration"] for r in its]
    ends, total = [], 0
    for m in epochs:
        total += m["iterations"]
        ends.append(total)
    a, b, c = st.columns(3)
    with a:
        ui.show_chart(ui.fig_lines(x, {"loss": [r["loss"] for r in its], "cross-entropy": [r["ce"] for r in its]},
                                   "Loss", "iteration", "loss", markers=False, height=300), key="tr_loss")
    with b:
        held = "validation" if run["config"].get("val_split") else "test"
        fig = ui.fig_lines({"train batch accuracy": x, f"{held} accuracy (epoch end)": ends},
                           {"train batch accuracy": [r["accuracy"] for r in its],
                            f"{held} accuracy (epoch end)": [m["val_accuracy" if held == "validation" else
                                                                "test_accuracy"] for m in epochs]},
                           "Accuracy", "iteration", "accuracy", markers=False, yrange=(0, 1.02), height=300)
        fig.update_traces(mode="lines+markers", selector=dict(name=f"{held} accuracy (epoch end)"))
        ui.show_chart(fig, key="tr_acc")
    trainer = run["trainer"]
    events = list(trainer.events) if trainer is not None else []
    with c:
        if run["config"]["objective"] == "jem":
            fig = ui.fig_lines(x, {"E(data) - E(samples)": [r["px"] for r in its],
                                   "E(data)": [r["energy_data"] for r in its],
                                   "E(samples)": [r["energy_samples"] for r in its]},
                               "Energies", "iteration", "energy", markers=False, height=300)
        else:
            fig = ui.fig_lines(x, {"E(data)": [r["energy_data"] for r in its]}, "Energy of the data",
                               "iteration", "energy", markers=False, height=300)
        mark_events(fig, events)
        ui.show_chart(fig, key="tr_energy")
    if run["config"].get("val_split"):
        validation_curves(epochs, ends, events)


def mark_events(fig, events: list[dict]) -> None:
    """Dashed vertical lines at the iterations of drift (orange) and divergence (red) events."""
    for e in events:
        drift = e.get("kind") == "drift"
        fig.add_vline(x=e["iteration"], line_dash="dash", line_color="#e67e22" if drift else "#c0392b",
                      annotation_text=f"drift: {e.get('signal')}" if drift else "divergence",
                      annotation_position="top left")


def validation_curves(epochs: list[dict], ends: list[int], events: list[dict]) -> None:
    """Per-epoch validation figures (accuracy, ECE, buffer-sample quality) against the iteration of each
    epoch's end, with the drift and divergence events marked."""
    if not epochs:
        st.caption("Validation figures appear after the first epoch.")
        return
    a, b = st.columns(2)
    with a:
        fig = ui.fig_lines(ends, {"validation accuracy": [m.get("val_accuracy") for m in epochs],
                                  "validation ECE": [m.get("val_ece") for m in epochs],
                                  "judge agrees on buffer samples": [m.get("sample_agreement") for m in epochs]},
                           "Validation (epoch end)", "iteration", "fraction", yrange=(0, 1.02), height=300)
        mark_events(fig, events)
        ui.show_chart(fig, key="tr_val")
    with b:
        fig = ui.fig_lines(ends, {"classifier FD of buffer samples": [m.get("sample_fd") for m in epochs]},
                           "Sample quality (Fréchet distance to validation images, lower is better)",
                           "iteration", "distance", height=300)
        mark_events(fig, events)
        ui.show_chart(fig, key="tr_fd")
    log_px = [m.get("val_log_px") for m in epochs]
    if any(isinstance(v, (int, float)) and math.isfinite(v) for v in log_px):
        fig = ui.fig_lines(ends, {"validation log p(x)": log_px},
                           "Normalised likelihood of validation images (nats per image, higher is better)",
                           "iteration", "nats", height=280)
        mark_events(fig, events)
        ui.show_chart(fig, key="tr_logpx")
        se = max((m.get("val_log_z_se") or 0.0) for m in epochs)
        st.caption("Mean log p(x) = -E(x) - log Z of up to 1,000 validation images, log Z by a small forward-AIS "
                   f"run per epoch (bootstrap SE up to {se:.2g} nats). Few temperatures over-state log p(x): read "
                   "the trend, and the Likelihood page for a reported figure.")


def checkpoint_history(ctx: ui.Context) -> None:
    """The chosen model's own per-epoch training curves, read from its checkpoint (before any run here)."""
    hist = (ctx.model.metadata.get("metrics") or {}).get("history") or []
    if not hist:
        st.info(f"{ctx.name} carries no training history. Choose the settings and press **Start training**.")
        return
    m = ctx.model.metadata
    staged = bool((m.get("train_args") or {}).get("init_from"))
    st.markdown(f"**How {ctx.name} was trained** (per-epoch figures stored in its checkpoint: "
                f"`{m.get('objective')}` on `{m.get('dataset')}`, {len(hist)} epochs, "
                f"{sum(h.get('seconds', 0) for h in hist) / 60:.1f} min recorded"
                + ("; this is the last stage of a staged training that started from another checkpoint, whose "
                   "earlier stages the model card lists" if staged else "") + "). Press **Start training** "
                "to train your own; its curves replace these.")
    ep = [h["epoch"] for h in hist]
    a, b, c = st.columns(3)
    with a:
        ui.show_chart(ui.fig_lines(ep, {"loss": [h["loss"] for h in hist], "cross-entropy": [h["ce"] for h in hist],
                                        "test NLL": [h.get("test_nll") for h in hist]},
                                   "Loss", "epoch", "nats", height=300), key="tr_hist_loss")
    with b:
        ui.show_chart(ui.fig_lines(ep, {"train accuracy": [h["train_accuracy"] for h in hist],
                                        "test accuracy": [h["test_accuracy"] for h in hist]},
                                   "Accuracy", "epoch", "accuracy", yrange=(0, 1.02), height=300), key="tr_hist_acc")
    with c:
        ui.show_chart(ui.fig_lines(ep, {"E(data)": [h["energy_data"] for h in hist],
                                        "E(samples)": [h["energy_samples"] for h in hist]},
                                   "Energies (epoch means)", "epoch", "energy", height=300), key="tr_hist_energy")


def download_offer(ctx: ui.Context) -> None:
    """Offer to download MNIST's training split into the data root when it is not there."""
    if data_available("mnist", ctx.data_root, "train"):
        return
    with st.expander("MNIST's training split is not in the data root: download it", expanded=False):
        st.caption(f"Training on MNIST needs its 60,000 training images in the data root `{ctx.data_root}` "
                   "(the bundled demo pack holds only the test split). The download is about 11 MB from "
                   "torchvision's mirrors; offline, put the four IDX files at "
                   f"`{ctx.data_root}/MNIST/raw/{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte`.")
        if st.button("Download MNIST", key="tr_download_mnist"):
            bar = st.progress(0.0, text="Downloading MNIST...")
            try:
                download_dataset("mnist", ctx.data_root,
                                 lambda f, name: bar.progress(f, text=f"Downloaded {name}"))
                st.success("MNIST is in the data root: choose it as the dataset above.")
            except DataUnavailableError as e:
                st.error(f"The download failed (is this machine offline?). {e}")
            finally:
                bar.empty()


def live_view(ctx: ui.Context) -> None:
    run = st.session_state.get(RUN)
    if run is None:
        checkpoint_history(ctx)
        return
    if run["status"] != "running" and not run["registered"]:
        st.rerun()  # full rerun: stops the timer; the sidebar puts the new model into the picker
    cfg, last = run["config"], (run["iterations"][-1] if run["iterations"] else None)
    elapsed = (run["ended"] or time.time()) - run["started"]
    a, b, c, d = st.columns(4)
    a.metric("Status", run["status"])
    b.metric("Epoch", f"{len(run['epochs'])} / {cfg['epochs']}")
    c.metric("Iteration", last["iteration"] if last else 0)
    if cfg.get("val_split"):
        final = run["trainer"].final if run["trainer"] is not None else None
        d.metric("Test accuracy (chosen epoch)" if final else "Validation accuracy (last epoch)",
                 f"{final['test_accuracy']:.4f}" if final else
                 f"{run['epochs'][-1]['val_accuracy']:.4f}" if run["epochs"] else "n/a")
    else:
        d.metric("Test accuracy (last epoch)", f"{run['epochs'][-1]['test_accuracy']:.4f}" if run["epochs"] else "n/a")
    st.caption(f"{run['name']}: {OBJECTIVES['semi' if cfg['labels_per_class'] else cfg['objective']]} on "
               f"{cfg['dataset']}, {elapsed:.0f} s")
    if run["error"]:
        st.error(run["error"])
    curves(run)
    trainer = run["trainer"]
    left, right = st.columns([2, 3])
    with left:
        if trainer is not None and trainer.buffer is not None:
            ui.show_grid(trainer.buffer.subset(36), "samples in the replay buffer", key="tr_samples", nrow=6,
                         file_name=f"{run['name']}_samples.png")
    with right:
        events = list(trainer.events) if trainer is not None else []
        n_drift = sum(e.get("kind") == "drift" for e in events)
        st.markdown(f"**Divergence and drift events: {len(events) - n_drift} + {n_drift}** (marked on the curves)")
        if events:
            cols = ["kind", "epoch", "iteration", "reason", "began_at", "rolled_back_to", "actions", "new_lr_scale"]
            df = pd.DataFrame(events)
            df = df[[k for k in cols if k in df.columns]]
            if "actions" in df.columns:
                df["actions"] = df["actions"].map(lambda v: "; ".join(v) if isinstance(v, list) else v)
            st.dataframe(df, hide_index=True)
        else:
            st.caption("none so far (the guard rolls back on explosions and, with the drift guard, to before a slow "
                       "drift began, then lowers the learning rate or raises the energy penalty)")
        if trainer is not None and trainer.final:
            f = trainer.final
            st.markdown(f"**Chosen on validation: epoch {f['epoch']}** (validation accuracy "
                        f"{f['val_accuracy']:.4f}); test accuracy {f['test_accuracy']:.4f}, ECE {f['test_ece']:.3f} "
                        "(the test split is evaluated once, for this epoch).")
        with st.expander("Log"):
            st.code("\n".join(run["log"][-30:]) or "(empty)")


def result(run: dict) -> None:
    out = Path(run["out"])
    if run["status"] == "running" or not out.is_file():
        return
    st.success(f"{run['name']} is in the model picker (sidebar) as “{run.get('label') or run['name'] + ' (trained here)'}”.")
    a, b = st.columns([1, 2])
    a.download_button("Download checkpoint (.pt)", out.read_bytes(), file_name=out.name,
                      mime="application/octet-stream", key="tr_download", on_click="ignore")
    with b:
        folder = st.text_input("Save into folder", value=str(Path.home() / "jem_models"), key="tr_save_dir")
        if st.button("Save", key="tr_save"):
            target = Path(folder).expanduser().resolve()
            if target == ui.CHECKPOINT_DIR.resolve():
                st.error("checkpoints/ holds the bundled models: choose another folder.")
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(out, target / out.name)
                st.success(f"Saved {target / out.name}")


def estimate_seconds(cfg: TrainConfig, n: int = 3) -> dict:
    """Time a run before it starts: build its :class:`Trainer` (data, model, buffer) and time ``n`` training
    iterations on this machine (:meth:`Trainer.time_iterations`).

    Returns ``{"per_iteration" (s), "iterations" (per epoch), "epochs", "evaluation" (s per epoch: one timed
    validation pass, 0 without a validation split), "total" (s: epochs x (iterations x per_iteration +
    evaluation)), "setup" (s to load data and build the model)}``. Raises what :class:`Trainer` raises (bad
    settings, data missing)."""
    t0 = time.perf_counter()
    trainer = Trainer(dataclasses.replace(cfg))
    setup = time.perf_counter() - t0
    per = trainer.time_iterations(n)
    iters = trainer.iterations_per_epoch()
    t1 = time.perf_counter()
    if trainer.val_set is not None:
        trainer.validate()
    evaluation = time.perf_counter() - t1
    return {"per_iteration": per, "iterations": iters, "epochs": cfg.epochs,
            "total": (per * iters + evaluation) * cfg.epochs, "setup": setup, "evaluation": evaluation}


def time_estimate(cfg: TrainConfig) -> None:
    """A button that times a few iterations of the chosen settings and shows the run's expected duration."""
    key = repr(cfg)
    ss = st.session_state
    est = ss.get("tr_estimate")
    a, b = st.columns([1, 5])
    if a.button("Estimate time", key="tr_estimate_btn",
                help="builds the run and times 3 training iterations on this machine (a few seconds)"):
        with st.spinner("Timing 3 iterations..."):
            try:
                est = ss["tr_estimate"] = {"key": key, **estimate_seconds(cfg)}
            except (ValueError, DataUnavailableError) as e:
                est = ss["tr_estimate"] = {"key": key, "error": str(e)}
    if est and est.get("key") == key:
        if est.get("error"):
            b.error(est["error"])
        else:
            total = est["total"]
            b.info(f"About **{total / 60:.1f} min** " if total >= 90 else f"About **{total:.0f} s** ")
            b.caption(f"{est['epochs']} epoch(s) x ({est['iterations']} iterations x {est['per_iteration']:.3f} s + "
                      f"{est['evaluation']:.1f} s of validation), timed here just now, plus {est['setup']:.0f} s to "
                      "load the data. Other work on this machine slows it.")


def main(ctx: ui.Context) -> None:
    runs.run_folders().sweep()  # the folders of runs whose tab is gone
    run = st.session_state.get(RUN)
    running = bool(run and run["status"] == "running")
    cfg, name = settings(ctx, disabled=running)
    a, b, c = st.columns([1, 1, 4])
    a.button("Start training", key="tr_start", type="primary", disabled=running, on_click=start, args=(cfg, name))
    b.button("Stop training", key="tr_stop", disabled=not running, on_click=stop)
    keep = c.toggle("Keep training if I close this tab", key="tr_keep", **ui.PERSIST,
                    help="by default a run stops by itself within about 25 iterations once its browser tab is gone, "
                         "so that nobody's forgotten run keeps the machine busy")
    if run is not None:
        run["keep"] = bool(keep)
    if st.session_state.pop(BUSY, False):
        st.warning(f"Another session is training on this machine ({MAX_TRAINING_RUNS} run at a time on its "
                   f"{ui.N_WORKERS} cores): nothing was started. Try again when it has finished.")
    if run is not None and run.get("stop_reason") and run["status"] != "running":
        st.info(f"The run stopped because {run['stop_reason']}.")

    if not running:
        time_estimate(cfg)
    download_offer(ctx)

    @st.fragment(run_every=1.0 if running else None)
    def live() -> None:
        live_view(ctx)

    live()
    if run is not None:
        result(run)


ui.run_page(main, "Train", "Train in the background; the page stays usable and curves refresh every second. "
            "Before a run, the chosen model's own training curves are shown from its checkpoint.")
