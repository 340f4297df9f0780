"""How photo-style digits score: MNIST test digits rendered as phone photos of ink on paper (dark on light,
RGB, a few hundred pixels, uneven light, blur, JPEG), prepared as uploads with and without the digit-style
normalisation, then classified and checked against the "unusual input" verdict.

    python bench/photo_digits.py --n 300      # about 20 s on one core

Prints one JSON line per preprocessing: accuracy, the fraction flagged unusual, and the median log p(x)
percentile; the MNIST originals give the reference false-alarm rate (5% by construction of the threshold).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def photo_of_digit(x28: np.ndarray, rng: np.random.Generator) -> bytes:
    """A 28x28 uint8 MNIST digit (light on dark) as a JPEG photo of dark ink on lit paper, 200-400 px wide."""
    side = int(rng.integers(200, 400))
    ink = 1 - x28.astype(np.float32) / 255  # 1 = paper, 0 = ink
    img = Image.fromarray((ink * 255).astype(np.uint8)).resize((int(side * 0.7),) * 2, Image.BILINEAR)
    canvas = Image.new("L", (side, side), 255)
    canvas.paste(img, ((side - img.width) // 2 + int(rng.integers(-10, 10)),
                       (side - img.height) // 2 + int(rng.integers(-10, 10))))
    a = np.asarray(canvas).astype(np.float32)[..., None] / 255
    yy, xx = np.mgrid[0:side, 0:side] / side
    light = (0.78 + 0.12 * xx + 0.06 * yy)[..., None]  # uneven light on the paper
    paper = light * np.array([0.97, 0.95, 0.90])
    rgb = a * paper + (1 - a) * np.array([0.12, 0.12, 0.16]) + rng.normal(0, 0.02, (side, side, 3))
    im = Image.fromarray((np.clip(rgb, 0, 1) * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.0))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def measure(checkpoint: str, n: int, digit_style: bool, seed: int = 0) -> dict:
    """Accuracy and unusual-input rate of ``checkpoint`` on ``n`` photo-style MNIST test digits."""
    from jem_core.checkpoint import load_checkpoint
    from jem_core.data import load_dataset
    from jem_core.images import prepare_upload
    from jem_core.scoring import score_batch

    ck = load_checkpoint(checkpoint)
    m = ck.metadata
    test = load_dataset("mnist", "test", download=False)
    raw = ((test.x[:n, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    rng = np.random.default_rng(seed)
    x = torch.stack([prepare_upload(photo_of_digit(raw[i], rng), f"photo{i}.jpg", int(m["in_channels"]),
                                    int(m["image_size"]), digit_style=digit_style).tensor for i in range(n)])
    res = score_batch(ck.model, x, m.get("reference"), m.get("class_names"))
    return {"checkpoint": checkpoint, "n": n, "digit_style": digit_style,
            "accuracy": round(float(np.mean([r.label == int(t) for r, t in zip(res, test.y[:n])])), 4),
            "unusual": round(float(np.mean([r.unusual for r in res])), 4),
            "median_percentile": round(float(np.median([r.percentile for r in res])), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "mnist_jem.pt"))
    ap.add_argument("--n", type=int, default=300)
    a = ap.parse_args()
    for ds in (False, True):
        print(json.dumps(measure(a.checkpoint, a.n, ds)), flush=True)


if __name__ == "__main__":
    main()
