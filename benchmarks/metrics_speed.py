"""Seconds per 512x512 image for each metric on this CPU (issue 4 benchmark).

python benchmarks/metrics_speed.py        # prints a table, writes benchmarks/metrics_speed.json
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from skimage import data as skdata


def main(threads: int = 2, repeats: int = 3):
    from teasr_cli.metrics import METRICS

    torch.set_num_threads(threads)
    hr = torch.from_numpy(np.ascontiguousarray(skdata.astronaut())).permute(2, 0, 1)[None].float() / 255  # 512x512
    sr = (hr + 0.03 * torch.randn(hr.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    rows = []
    for name, spec in METRICS.items():
        fn = spec.build()
        args = (sr, hr) if spec.needs_reference else (sr,)
        with torch.no_grad():
            fn(*args)  # warm-up: weights loaded, kernels picked
            t0 = time.perf_counter()
            for _ in range(repeats):
                value = float(fn(*args)[0])
        rows.append({"metric": name, "seconds_per_image": (time.perf_counter() - t0) / repeats, "value": value})
        print(f"{name:>10}  {rows[-1]['seconds_per_image']:7.3f} s/image  (value {value:.4f})", flush=True)
    out = {"machine": f"{platform.machine()}, {threads} threads", "image": "512x512 astronaut + noise", "rows": rows}
    (Path(__file__).parent / "metrics_speed.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
