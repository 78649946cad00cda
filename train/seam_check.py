"""The 2000x1500 look-at-it check of issue 5: a held-out photo downscaled (bicubic) to 500x375, upscaled x4 by a
model, and one 400x300 region side by side with plain bicubic (left), to look for token grids, checkerboards
and tile seams at full size. It also prints a number for the token grid: the mean absolute step between
neighbouring pixels across 16-px token borders over that within tokens (1.0: no grid), and the same for 4 px.
The 16-px number also counts the 4-px grid of the LR pixels (bicubic itself scores 1.09), so "16/4" compares
16-px borders with the other 4-px borders only: it sees a token grid and not the LR pixel grid.

    python train/seam_check.py --model teasr_cli/weights --out crop.png [--steps 1]
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

PHOTO = "data/photos/val/Dragonfly_by_Bolly.png"
BOX = (800, 400, 1200, 700)  # the region of the 2000x1500 output shown side by side


def step_ratio(im: Image.Image, num, den) -> float:
    """Mean |step| between neighbours at the borders where `num(at)` holds over those where `den(at)` holds, x and
    y averaged; `at` numbers the borders from 1 (border k lies between pixels k-1 and k)."""
    y = np.asarray(im.convert("L"), dtype=np.float64)
    ratios = []
    for d in (np.abs(np.diff(y, axis=1)), np.abs(np.diff(y, axis=0)).T):
        at = np.arange(d.shape[1]) + 1
        ratios.append(d[:, num(at)].mean() / d[:, den(at)].mean())
    return float(np.mean(ratios))


def grid_ratio(im: Image.Image, period: int) -> float:
    """Mean |step| across borders of a `period`-pixel grid / within its cells (x and y)."""
    return step_ratio(im, lambda at: at % period == 0, lambda at: at % period != 0)


def token_grid_ratio(im: Image.Image, token: int = 16, pixel: int = 4) -> float:
    """Mean |step| across `token`-px borders / across the `pixel`-px borders between them (x and y)."""
    return step_ratio(im, lambda at: at % token == 0, lambda at: (at % pixel == 0) & (at % token != 0))


def seam_check(model: str, photo: str = PHOTO, steps: int = 1, box=BOX):
    """(side-by-side crop, {"bicubic"|"model": {"16": ratio, "4": ratio, "16/4": ratio}}) of the 2000x1500 outputs."""
    from teasr_cli.pipeline import Upscaler

    lr = Image.open(photo).convert("RGB").resize((500, 375), Image.BICUBIC, reducing_gap=None)
    sr = Upscaler.from_pretrained(model)(lr, steps=steps, seed=0)
    assert sr.size == (2000, 1500), sr.size
    bic = lr.resize((2000, 1500), Image.BICUBIC)
    w, h = box[2] - box[0], box[3] - box[1]
    side = Image.new("RGB", (2 * w, h))
    side.paste(bic.crop(box), (0, 0))
    side.paste(sr.crop(box), (w, 0))
    return side, {
        name: {"16": grid_ratio(im, 16), "4": grid_ratio(im, 4), "16/4": token_grid_ratio(im)}
        for name, im in (("bicubic", bic), ("model", sr))
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--photo", default=PHOTO)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--box", type=int, nargs=4, default=BOX, help="region of the 2000x1500 output")
    a = p.parse_args()
    side, r = seam_check(a.model, a.photo, a.steps, tuple(a.box))
    print(
        "grid ratio (16 px, 4 px, 16/4): "
        + "; ".join(f"{n} {r[n]['16']:.3f}, {r[n]['4']:.3f}, {r[n]['16/4']:.3f}" for n in ("bicubic", "model"))
    )
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    side.save(a.out)
    print(f"wrote {a.out} (left bicubic, right {a.model}, {a.steps} step(s))")
