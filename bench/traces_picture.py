"""What one redraw of the live chains' traces picture costs the server: blitted (the axes kept as a background,
the traces drawn on it) against drawing everything (``app.figures.ChainTracesPicture(blit=False)``).

    python bench/traces_picture.py --out bench/traces_picture.json

A live-like sequence: 16 chains, 10 classes, a report every step, three steps per refresh, histories thinned
to ``--points`` reports as the Langevin page keeps them. Each round redraws ``--refreshes`` refreshes with both
pictures, in alternating order, on one thread; the figure is the median over rounds of the ratio of their total
times in the round (machine load that drifts over seconds cancels), beside the medians of the absolute times,
which depend on the machine. The two pictures' PNGs are checked to be the same bytes.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from app.figures import ChainTracesPicture  # noqa: E402


def histories(refreshes: int, points: int, chains: int = 16, classes: int = 10, per_refresh: int = 3,
              seed: int = 0) -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """The ``(steps, energies [T, N], preds [T, N])`` a live view draws at each of ``refreshes`` refreshes, at most
    ``points`` reports each (older reports thinned evenly)."""
    g = torch.Generator().manual_seed(seed)
    total = refreshes * per_refresh + 1
    e = torch.cumsum(torch.randn(total, chains, generator=g) * 0.05, 0) - 3.0
    p = torch.randint(0, classes, (total, chains), generator=g)
    out = []
    for r in range(1, refreshes + 1):
        t = r * per_refresh + 1
        idx = torch.linspace(0, t - 1, min(t, points)).round().long().unique()
        out.append((idx.tolist(), e[idx], p[idx]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--refreshes", type=int, default=120)
    ap.add_argument("--points", type=int, default=400, help="reports kept per chain (the page's HISTORY_POINTS)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default="bench/traces_picture.json")
    a = ap.parse_args()
    if a.refreshes < 1 or a.points < 2 or a.rounds < 1:
        raise SystemExit("error: --refreshes and --rounds must be >= 1 and --points >= 2")
    torch.set_num_threads(1)
    seq = histories(a.refreshes, a.points)
    names = [str(i) for i in range(10)]
    times: dict[str, list[float]] = {"blit": [], "full": []}
    ratios, size = [], 0
    for r in range(a.rounds):
        pictures = {"blit": ChainTracesPicture(names, "Energy E(x) of each chain", "Prediction"),
                    "full": ChainTracesPicture(names, "Energy E(x) of each chain", "Prediction", blit=False)}
        spent = {"blit": 0.0, "full": 0.0}
        order = ["blit", "full"] if r % 2 == 0 else ["full", "blit"]
        for steps, energies, preds in seq:
            pngs = {}
            for name in order:
                t0 = time.perf_counter()
                pngs[name] = pictures[name].png(steps, energies, preds)
                spent[name] += time.perf_counter() - t0
            if pngs["blit"] != pngs["full"]:
                raise SystemExit(f"error: the blitted picture differs from the full drawing at step {steps[-1]}")
            size = len(pngs["blit"])
        for name in spent:
            times[name].append(spent[name] / len(seq) * 1000)
        ratios.append(spent["blit"] / spent["full"])
    result = {"refreshes": a.refreshes, "points": a.points, "rounds": a.rounds,
              "blit_over_full": round(statistics.median(ratios), 3),
              "ms_per_redraw": {k: round(statistics.median(v), 2) for k, v in times.items()},
              "png_bytes_last": size, "torch": torch.__version__, "cpu": platform.processor() or platform.machine()}
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
