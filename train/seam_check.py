"""The 2000x1500 look-at-it check of issue 5: a held-out photo downscaled (bicubic) to 500x375, upscaled x4 by a
model, and one 400x300 region side by side with plain bicubic (left), to look for token grids, checkerboards
and tile seams at full size. It also prints a number for the token grid: the mean absolute step between
neighbouring pixels across 16-px token borders over that within tokens (1.0: no grid), and the same for 4 px.

    python train/seam_check.py --model teasr_cli/weights --out crop.png [--steps 1]
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from teasr_cli.pipeline import Upscaler

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--out", required=True)
p.add_argument("--photo", default="data/photos/val/Dragonfly_by_Bolly.png")
p.add_argument("--steps", type=int, default=1)
p.add_argument("--box", type=int, nargs=4, default=(800, 400, 1200, 700), help="region of the 2000x1500 output")
a = p.parse_args()

lr = Image.open(a.photo).convert("RGB").resize((500, 375), Image.BICUBIC, reducing_gap=None)
sr = Upscaler.from_pretrained(a.model)(lr, steps=a.steps, seed=0)
assert sr.size == (2000, 1500), sr.size
bic = lr.resize((2000, 1500), Image.BICUBIC)
w, h = a.box[2] - a.box[0], a.box[3] - a.box[1]
side = Image.new("RGB", (2 * w, h))
side.paste(bic.crop(a.box), (0, 0))
side.paste(sr.crop(a.box), (w, 0))


def grid_ratio(im: Image.Image, period: int) -> float:
    """Mean |step| between neighbours across borders of a `period`-pixel grid / within its cells (x and y)."""
    y = np.asarray(im.convert("L"), dtype=np.float64)
    ratios = []
    for d in (np.abs(np.diff(y, axis=1)), np.abs(np.diff(y, axis=0)).T):
        border = (np.arange(d.shape[1]) + 1) % period == 0
        ratios.append(d[:, border].mean() / d[:, ~border].mean())
    return float(np.mean(ratios))


print(
    "grid ratio (16 px, 4 px): bicubic "
    + ", ".join(f"{grid_ratio(bic, k):.3f}" for k in (16, 4))
    + "; model "
    + ", ".join(f"{grid_ratio(sr, k):.3f}" for k in (16, 4))
)
Path(a.out).parent.mkdir(parents=True, exist_ok=True)
side.save(a.out)
print(f"wrote {a.out} (left bicubic, right {a.model}, {a.steps} step(s))")
