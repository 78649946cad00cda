"""Upscale time and peak memory of `teasr upscale` on this machine (issue 2 benchmark).

Every case runs in a fresh subprocess so its peak RSS (ru_maxrss) is its own; times exclude model
loading. Inputs are crops/resizes of a real photo. Prints a table and records benchmarks/upscale_speed.json.

    python benchmarks/upscale_speed.py                 # embedded model (or the tiny-cpu recipe size, random weights)
    python benchmarks/upscale_speed.py --quick         # fewer cases
    python benchmarks/upscale_speed.py --vs-realesrgan # 512x512 -> 2048x2048, teasr 1 step vs Real-ESRGAN x4plus
    python benchmarks/upscale_speed.py --vs-dtypes     # the same case in fp32 and in bf16 (what --dtype auto picks)
    python benchmarks/upscale_speed.py --vs-realesrgan --model train/study/tiny.toml,train/study/conv.toml \
        --record upscale_vs_realesrgan_study.json     # several models (a .toml: its network, random weights)
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent


def child(args):
    """One case: load, warm up on a tiny input, then time one upscale; print a JSON line."""
    import numpy as np
    import torch
    from PIL import Image

    from teasr_cli.pipeline import UpscaleSettings

    torch.set_num_threads(args.threads)
    photo = Image.open(args.photo).convert("RGB")
    w, h = args.size
    img = photo.resize((w, h), Image.LANCZOS)
    lq = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 255
    if args.model == "realesrgan":  # the reference GAN upscaler on the CPU (ncnn), timed the same way
        from teasr_cli.evaluation import realesrgan_x4plus

        net = realesrgan_x4plus()
        net(lq[..., :32, :32])
        t0 = time.perf_counter()
        net(lq)
        print(
            json.dumps(
                {
                    "seconds": time.perf_counter() - t0,
                    "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                }
            )
        )
        return
    up = load_model(args.model, args.dtype)
    up.upscale_tensor(lq[..., :32, :32], UpscaleSettings(steps=1))  # warm-up (allocator, kernels)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tile = args.tile if args.tile > 0 else None
    if args.tile == -1:  # untiled: one tile covering the whole latent
        tile = max(h, w) * up.scale // up.codec.downsample
    t0 = time.perf_counter()
    up.upscale_tensor(lq, UpscaleSettings(steps=args.steps, tile=tile))
    dt = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"seconds": dt, "peak_rss_mb": rss / 1024, "rss_before_mb": rss0 / 1024, "dtype": up.dtype_name}))


def load_model(spec, dtype="auto"):
    from teasr_cli.pipeline import Upscaler

    if spec not in ("recipe", "buffers") and not spec.endswith(".toml"):
        return Upscaler.from_pretrained(spec or None, device="cpu", dtype=dtype)
    # a recipe's network with random weights (the tiny-cpu size by default): same speed, usable before weights exist
    import tomllib
    import torch

    from teasr_cli.codecs import build_codec
    from teasr_cli.model import DiTConfig, TeasrDiT

    recipe = tomllib.loads(Path(spec if spec.endswith(".toml") else HERE.parent / "train/tiny-cpu.toml").read_text())
    codec = build_codec(recipe["codec"])
    # "buffers": the same pipeline with a 1-block, 64-wide DiT: what is left of the peak is the image-sized
    # buffers (latent, LQ latent, velocity, output), i.e. the memory that grows with the output size
    small = {"hidden_size": 64, "depth": 1, "num_heads": 1} if spec == "buffers" else {}
    model = TeasrDiT(DiTConfig.from_dict({"latent_channels": codec.latent_channels, **recipe["model"], **small}))
    torch.manual_seed(0)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return Upscaler(model, codec, device="cpu", dtype=dtype)


CASES_FULL = [  # (w, h, steps, tile): tile 0 = auto, -1 = untiled
    (128, 128, 1, 0),
    (128, 128, 4, 0),
    (256, 256, 1, 0),
    (256, 256, 1, -1),
    (256, 256, 1, 64),
    (512, 512, 1, 0),
    (512, 512, 4, 0),
    (1024, 1024, 1, 0),
    (1024, 1024, 4, 0),
    (2000, 1500, 1, 0),
]
CASES_QUICK = [
    (128, 128, 1, 0),
    (128, 128, 4, 0),
    (256, 256, 1, 0),
    (256, 256, 1, -1),
    (256, 256, 1, 32),
    (512, 512, 1, 0),
    (1024, 1024, 1, 0),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="model spec; 'recipe' = tiny-cpu size with random weights")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--photo", default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--memory", action="store_true", help="only the 2000x1500 peak-memory case, with the 'buffers' model"
    )
    ap.add_argument("--vs-realesrgan", action="store_true", help="512x512, teasr 1 step vs Real-ESRGAN, in rounds")
    ap.add_argument("--rounds", type=int, default=3, help="with --vs-realesrgan: rounds of all models")
    ap.add_argument("--vs-dtypes", action="store_true", help="512x512, teasr 1 step in fp32 vs bf16, 3 rounds")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--size", type=int, nargs=2)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--tile", type=int, default=0)
    ap.add_argument("--record", default=None, help="file name under benchmarks/ for the results (default by mode)")
    args = ap.parse_args()
    if args.photo is None:
        import skimage.data
        from PIL import Image

        args.photo = "/tmp/teasr_bench_photo.png"
        Image.fromarray(skimage.data.astronaut()).save(args.photo)
    if args.child:
        return child(args)
    if args.model is None:
        from teasr_cli.hub import EMBEDDED_DIR

        args.model = (
            "buffers" if args.memory else "default" if (EMBEDDED_DIR / "model.safetensors").exists() else "recipe"
        )
    rows = []
    cases = [(2000, 1500, 1, 0)] if args.memory else CASES_QUICK if args.quick else CASES_FULL
    models, dtypes = [args.model] * len(cases), [args.dtype] * len(cases)
    specs = args.model.split(",")  # --vs-realesrgan takes several, e.g. the study's recipes (random weights)
    if args.vs_realesrgan:  # alternate them, so a noisy machine slows all alike; compare medians
        models = [*specs, "realesrgan"] * args.rounds
        cases, dtypes = [(512, 512, 1, 0)] * len(models), [args.dtype] * len(models)
    if args.vs_dtypes:
        cases, models, dtypes = [(512, 512, 1, 0)] * 6, [args.model] * 6, ["fp32", "bf16"] * 3
    for (w, h, steps, tile), model, dtype in zip(cases, models, dtypes):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            "--model",
            model,
            "--threads",
            str(args.threads),
            "--dtype",
            dtype,
            "--photo",
            args.photo,
            "--size",
            str(w),
            str(h),
            "--steps",
            str(steps),
            "--tile",
            str(tile),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            print(res.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"case {w}x{h} failed")
        r = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(
            {
                "model": model,
                "input": f"{w}x{h}",
                "output": f"{4 * w}x{4 * h}",
                "steps": steps,
                "tiling": {0: "auto", -1: "untiled"}.get(tile, f"tile {tile}"),
                **r,
            }
        )
        print(
            f"{model:>10} {r.get('dtype', ''):>8} {rows[-1]['input']:>10} -> {rows[-1]['output']:>10}  steps {steps}  "
            f"{rows[-1]['tiling']:>8}  "
            f"{r['seconds']:8.2f} s  peak {r['peak_rss_mb']:7.0f} MB",
            flush=True,
        )
    out = {
        "machine": f"{platform.processor() or platform.machine()}, {args.threads} threads",
        "model": args.model,
        "rows": rows,
    }
    if args.vs_realesrgan:
        med = {m: statistics.median(r["seconds"] for r in rows if r["model"] == m) for m in dict.fromkeys(models)}
        out["median_seconds"] = med
        out["realesrgan_over_teasr"] = {m: med["realesrgan"] / med[m] for m in specs}
        # what was timed: a folder's network, so a ratio can be matched to another folder of the same form
        out["networks"] = {
            m: json.loads((Path(m) / "config.json").read_text())["model"] for m in specs if Path(m).is_dir()
        }
        for m in specs:
            print(
                f"median: {m} 1 step {med[m]:.2f} s, Real-ESRGAN x4plus {med['realesrgan']:.2f} s: "
                f"{out['realesrgan_over_teasr'][m]:.2f}x as fast (the budget asks for 3x)"
            )
    if args.vs_dtypes:
        med = {d: statistics.median(r["seconds"] for r in rows if r["dtype"] == d) for d in ("fp32", "bf16")}
        out["median_seconds"], out["fp32_over_bf16"] = med, med["fp32"] / med["bf16"]
        print(
            f"median: fp32 {med['fp32']:.2f} s, bf16 {med['bf16']:.2f} s: bf16 is {out['fp32_over_bf16']:.2f}x as fast"
        )
    name = args.record or (
        "upscale_memory.json"
        if args.memory
        else "upscale_vs_realesrgan.json"
        if args.vs_realesrgan
        else "upscale_dtypes.json"
        if args.vs_dtypes
        else "upscale_speed.json"
    )
    (HERE / name).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
