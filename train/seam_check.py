"""The 2000x1500 look-at-it check of issue 5: a held-out photo downscaled (bicubic) to 500x375, upscaled x4 by a
model, and one 400x300 region side by side with plain bicubic (left), to look for token grids, checkerboards
and tile seams at full size.

    python train/seam_check.py --model train/checkpoints/tiny-sad4-step1800 --out crop.png [--steps 1]
"""
import argparse
from pathlib import Path

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
Path(a.out).parent.mkdir(parents=True, exist_ok=True)
side.save(a.out)
print(f"wrote {a.out} (left bicubic, right {a.model}, {a.steps} step(s))")
