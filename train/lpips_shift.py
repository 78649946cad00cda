"""Does a model game LPIPS-alex with a pattern aligned to AlexNet's stride 4? 1-step LPIPS on the validation
crops (the LR `teasr eval` makes: same preset, seed 0, per-image index), with both images cropped by k = 0..3 px
first. k = 0 is what `teasr eval` reports; a model that only adds a 4-px checkerboard scores well at k = 0 alone.

    python train/lpips_shift.py --degrade realesrgan MODEL [MODEL ...]
"""

import argparse

import numpy as np
import torch

from teasr_cli.benchsets import synthetic_pairs
from teasr_cli.metrics import LPIPS
from teasr_cli.pipeline import Upscaler, UpscaleSettings

p = argparse.ArgumentParser()
p.add_argument("models", nargs="+")
p.add_argument("--degrade", default="realesrgan")
p.add_argument("--hq", default="data/photos/val_hr")
a = p.parse_args()

alex = LPIPS(net="alex").eval()
pairs = synthetic_pairs(a.hq, a.degrade)  # the pairs `teasr eval --hq ... --degrade ...` scores
print("model | " + " | ".join(f"+{k} px" for k in range(4)))
for m in a.models:
    up = Upscaler.from_pretrained(m)
    scores = np.zeros((len(pairs), 4))
    for i, pair in enumerate(pairs):
        lq, hq = pair.load()
        with torch.no_grad():
            sr = up.upscale_tensor(lq, UpscaleSettings(steps=1, seed=0))
            scores[i] = [float(alex(sr[..., k:, k:], hq[..., k:, k:])) for k in range(4)]
    print(f"{m} | " + " | ".join(f"{v:.3f}" for v in scores.mean(0)), flush=True)
