"""The look-at-it figure of issue 18: a noisy degraded held-out photo and a clean portrait, each upscaled x4 by
bicubic, Real-ESRGAN x4plus and a model at 1 and 4 steps, one crop per column at full size.

    python train/compare_crops.py --model teasr_cli/weights --out crops.png [--steps 1 4] [--model-name NAME]

Row 1: `data/photos/val_hr/LadyBird_0.png` (held out) through the `realesrgan` preset (noise, blur, JPEG).
Row 2: matplotlib's grace_hopper portrait, bicubic-downscaled (clean LR). It is a training photo: no held-out
portrait exists offline, and the row looks for form artefacts (halos, a 16-px token grid on skin), not recall.
"""

import argparse

import matplotlib.cbook
import numpy as np
import torch
from PIL import Image, ImageDraw

from teasr_cli.degrade import make_lq
from teasr_cli.evaluation import realesrgan_x4plus
from teasr_cli.imageio import from_pil
from teasr_cli.pipeline import Upscaler

p = argparse.ArgumentParser()
p.add_argument("--model", required=True)
p.add_argument("--model-name", default="teasr")
p.add_argument("--out", required=True)
p.add_argument("--steps", type=int, nargs="+", default=[1, 4])
p.add_argument("--noisy", default="data/photos/val_hr/LadyBird_0.png")
p.add_argument("--size", type=int, default=256, help="crop size in output pixels")
a = p.parse_args()


def to_image(x: torch.Tensor) -> Image.Image:
    return Image.fromarray((x[0].clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))


def resized(lq: torch.Tensor, resample) -> Image.Image:
    return to_image(lq).resize((lq.shape[-1] * 4, lq.shape[-2] * 4), resample)


hopper = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg"))  # 512x600; its LR is 128x150
rows = [  # (label, LR tensor, crop centre as a fraction of the image)
    (
        "noisy LR (held out)",
        make_lq(from_pil(Image.open(a.noisy)).rgb[None], "realesrgan", torch.Generator().manual_seed(0)),
        (0.5, 0.5),
    ),
    ("clean portrait LR", make_lq(from_pil(hopper).rgb[None], "bicubic", torch.Generator()), (0.5, 0.42)),
]
model, esrgan = Upscaler.from_pretrained(a.model), realesrgan_x4plus()
methods = {
    "LR (nearest)": lambda lq: resized(lq, Image.NEAREST),
    "bicubic": lambda lq: resized(lq, Image.BICUBIC),
    "Real-ESRGAN x4plus": lambda lq: to_image(esrgan(lq)),
    **{
        f"{a.model_name} {n} step{'s' * (n > 1)}": (lambda lq, n=n: model(to_image(lq), steps=n, seed=0))
        for n in a.steps
    },
}
s, pad = a.size, 18
fig = Image.new("RGB", (s * len(methods), (s + pad) * len(rows)), "white")
draw = ImageDraw.Draw(fig)
for r, (label, lq, (fx, fy)) in enumerate(rows):
    for c, (name, fn) in enumerate(methods.items()):
        sr = fn(lq)
        x0, y0 = int(fx * sr.width) - s // 2, int(fy * sr.height) - s // 2
        fig.paste(sr.crop((x0, y0, x0 + s, y0 + s)), (c * s, r * (s + pad) + pad))
        draw.text((c * s + 4, r * (s + pad) + 3), name if c else f"{label}: {name}", fill="black")
fig.save(a.out)
print(a.out)
