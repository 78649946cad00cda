"""Does a model game LPIPS-alex with a pattern aligned to AlexNet's stride 4? 1-step LPIPS on the validation
crops (the LR `teasr eval` makes: same preset, seed 0, per-image index), with both images cropped by k = 0..3 px
first. k = 0 is what `teasr eval` reports; a model that only adds a 4-px checkerboard scores well at k = 0 alone.

    python train/lpips_shift.py --degrade realesrgan MODEL [MODEL ...]
"""
import argparse
import glob
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from teasr_cli.benchsets import _read, synth_lq
from teasr_cli.metrics import LPIPS
from teasr_cli.pipeline import Upscaler

p = argparse.ArgumentParser()
p.add_argument("models", nargs="+")
p.add_argument("--degrade", default="realesrgan")
p.add_argument("--hq", default="data/photos/val_hr")
a = p.parse_args()

alex = LPIPS(net="alex").eval()
hqs = sorted(glob.glob(f"{a.hq}/*.png"))
print("model | " + " | ".join(f"+{k} px" for k in range(4)))
for m in a.models:
    up = Upscaler.from_pretrained(m)
    scores = np.zeros((len(hqs), 4))
    for i, path in enumerate(hqs):
        lq, hq = synth_lq(_read(Path(path)), a.degrade, 0, i)
        lr = Image.fromarray((lq[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        sr = torch.from_numpy(np.asarray(up(lr, steps=1, seed=0)).copy()).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad():
            scores[i] = [float(alex(sr[..., k:, k:], hq[..., k:, k:])) for k in range(4)]
    print(f"{m} | " + " | ".join(f"{v:.3f}" for v in scores.mean(0)), flush=True)
