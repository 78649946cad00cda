"""The CUDA checks of a GPU burst, one PASS / FAIL / SKIP line each, details in a JSON file.

  upscale-fp32, upscale-bf16  `teasr upscale` (shipped model, 1 step, 128x128 -> 512x512) on CUDA equals the CPU
                              result in the same dtype: PSNR between the two 8-bit outputs >= 50 dB in fp32 (cuDNN's
                              TF32 convolutions and other kernels round differently), >= 45 dB in bf16. The scale:
                              on the CPU, bf16 against fp32 gives 53.7 dB (max 5 levels) on this input
  sad-bf16                    8 SAD steps in bf16 autocast on one fixed batch (the burst's model and objective):
                              the data term (the pixel anchor) goes down and no loss or weight is NaN/inf
  accelerate-launch           `accelerate launch --num_processes 1 -m teasr_cli train` runs 3 steps and exports
  qwen-offload                the Qwen-Image adapter, tiny random config, forward + backward on CUDA with offload
                              none, model and sequential; SKIP without diffusers (the device has none)
  sad-memory                  peak GPU memory of the CPU benchmark's cases (benchmarks/train_memory.json) on CUDA,
                              recorded beside the CPU's; PASS if SAD's one backward per graph saves memory there too

Without CUDA (train/gpu_burst.sh --dry-run) the CUDA checks say SKIP; those that are cheap still run their code on
the CPU, so a broken check shows before a GPU is spent on it. accelerate-launch runs for real either way.

    python train/cuda_checks.py --json $OUT/checks.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "train"))
import gpu_train  # noqa: E402

from teasr_cli import trainer  # noqa: E402

PSNR_MIN = {"fp32": 50.0, "bf16": 45.0}
CUDA = torch.cuda.is_available()


class Skip(Exception):
    pass


def psnr8(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def photo(size: int) -> Path:
    from PIL import Image
    from skimage import data as skdata

    path = Path(tempfile.mkdtemp(prefix="teasr-check-")) / "astronaut.png"
    Image.fromarray(skdata.astronaut()[:256, 128:384]).resize((size, size), Image.BICUBIC).save(path)
    return path


def upscale_check(dtype: str, size: int):
    """`teasr upscale` through the CLI itself (in-process), on CUDA and on the CPU."""
    from PIL import Image
    from typer.testing import CliRunner

    from teasr_cli.cli import app

    src = photo(size)
    outs = {}
    for dev in ("cuda" if CUDA else "cpu", "cpu"):
        dst = src.with_name(f"{dev}-{dtype}-{len(outs)}.png")
        r = CliRunner().invoke(app, ["upscale", str(src), "-o", str(dst), "--device", dev, "--dtype", dtype])
        if r.exit_code:
            raise RuntimeError(f"teasr upscale --device {dev} --dtype {dtype}: {r.output.strip().splitlines()[-1:]}")
        outs[len(outs)] = np.asarray(Image.open(dst).convert("RGB"))
    p = psnr8(outs[0], outs[1])
    detail = {
        "psnr_db": p,
        "max_abs": int(np.abs(outs[0].astype(int) - outs[1]).max()),
        "min_psnr_db": PSNR_MIN[dtype],
        "input": f"{size}x{size}",
    }
    if not CUDA:
        raise Skip(f"no CUDA (ran cpu vs cpu: PSNR {p:.1f} dB)", detail)
    return p >= PSNR_MIN[dtype], f"PSNR {p:.1f} dB (>= {PSNR_MIN[dtype]}), max |diff| {detail['max_abs']}", detail


def _burst_model(crop: int, batch: int):
    """The burst's model and objective (campaign or shipped init), one fixed batch from the pack, on the device."""
    from teasr_cli.codecs import build_codec
    from teasr_cli.data import HQImages, list_images
    from teasr_cli.metrics import LPIPS

    dev = "cuda" if CUDA else "cpu"
    init, campaign = gpu_train.start_point()
    data = str(gpu_train.PACK) if gpu_train.PACK.is_dir() else str(photo(256).parent)
    cfg = gpu_train.burst_config(gpu_train.RECIPE, init, campaign, data, "unused", 0)
    cfg.crop = crop
    model, mcfg = trainer.build_model(cfg)
    codec = (getattr(model, "codec", None) or build_codec(mcfg["codec"])).to(dev)
    lpips = LPIPS(net=cfg.lpips).to(dev).eval().requires_grad_(False) if cfg.lpips else None
    latent = (codec.latent_channels, crop // codec.downsample, crop // codec.downsample)
    hq, lq, draws = trainer.make_batch(HQImages(list_images(data), crop), cfg, 0, batch, latent, dev)
    return model.to(dev), codec, lpips, cfg, hq, lq, draws


def sad_check(steps: int = 8):
    from teasr_cli.sad import sad_losses

    crop, batch = (128, 8) if CUDA else (64, 2)
    model, codec, lpips, cfg, hq, lq, draws = _burst_model(crop, batch)
    sad_cfg = trainer.stage_sad_config(cfg)
    dev = hq.device.type
    x0 = hq * 2 - 1
    up = F.interpolate(lq * 2 - 1, scale_factor=cfg.scale, mode="bicubic", align_corners=False).clamp(-1, 1)
    z0, z_lq = codec.encode(x0), codec.encode(up)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=5e-4)
    hist = []
    for _ in range(steps if CUDA else 3):
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=CUDA):
            out = sad_losses(
                model, z0, z_lq, draws, sad_cfg, decode=codec.decode, x0=x0, lpips=lpips, backward=torch.Tensor.backward
            )
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        hist.append({k: float(v) for k, v in out.items()})
    finite = all(math.isfinite(v) for h in hist for v in h.values()) and all(
        bool(p.isfinite().all()) for p in trainable
    )
    key = "data" if "data" in hist[0] else "loss"  # the prior stage has no data term
    first, last = hist[0][key], hist[-1][key]
    detail = {"stage": cfg.stage, "crop": crop, "batch": batch, "term": key, "history": hist}
    if not CUDA:
        raise Skip(f"no CUDA (ran {len(hist)} fp32 steps on the CPU: {key} {first:.4f} -> {last:.4f})", detail)
    text = f"{cfg.stage}: {key} {first:.4f} -> {last:.4f} in {len(hist)} steps, {'all' if finite else 'NOT all'} finite"
    return finite and last < first, text, detail


def accelerate_check():
    """One process under `accelerate launch`, the documented multi-GPU entry point: SAD from the burst's --init."""
    init, _ = gpu_train.start_point()
    data = str(gpu_train.PACK) if gpu_train.PACK.is_dir() else str(photo(256).parent)
    run = Path(tempfile.mkdtemp(prefix="teasr-accel-")) / "run"
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        "--num_machines",
        "1",
        "--mixed_precision",
        "bf16" if CUDA else "no",
        "--dynamo_backend",
        "no",
        *([] if CUDA else ["--cpu"]),
        "-m",
        "teasr_cli",
        "train",
        "--stage",
        "sad",
        "--data",
        data,
        "--out",
        str(run),
        "--init",
        str(init),
        "--steps",
        "3",
        "--batch-size",
        "2",
        "--crop",
        "64",
        "--mixed-precision",
        "bf16" if CUDA else "no",
    ]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t = time.time()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    log = run / "metrics.jsonl"
    recs = [json.loads(ln) for ln in log.read_text().splitlines()] if log.exists() else []
    steps = max((x.get("step", 0) for x in recs if "loss" in x), default=0)
    ok = r.returncode == 0 and steps == 3 and (run / "model" / "model.safetensors").exists()
    tail = (r.stderr or r.stdout).strip().splitlines()[-1:] if not ok else []
    return (
        ok,
        f"rc {r.returncode}, {steps} steps, exported: {(run / 'model').exists()}, {time.time() - t:.0f} s"
        + (f"; {tail[0][:200]}" if tail else ""),
        {"cmd": cmd[2:], "rc": r.returncode},
    )


def qwen_check():
    """Forward + backward of the tiny adapter with each offload mode. none/model: every trainable (LoRA) weight gets
    a finite gradient; sequential streams the weights in per call, so gradients reach the input, not the weights."""
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise Skip("diffusers is not installed", {}) from None
    from teasr_cli.backbones import qwen_image as qi

    dev = "cuda" if CUDA else "cpu"
    res = {}
    for mode in ("none", "model", "sequential"):
        m = qi.build_tiny(seed=0)
        qi.add_lora(m, 4, 4)
        qi.enable_offload(m, mode, dev)
        z_t = torch.randn(2, 4, 8, 8, device=dev, requires_grad=True)
        z_lq = torch.randn(2, 4, 8, 8, device=dev)
        t = torch.tensor([0.7, 0.3], device=dev)
        v = m(z_t, t, z_lq, t)
        x = m.codec.decode(v)
        (v.square().mean() + x.square().mean()).backward()
        grads = [p.grad for p in m.parameters() if p.requires_grad]
        res[mode] = {
            "out_finite": bool(v.isfinite().all() and x.isfinite().all()),
            "input_grad_finite": bool(z_t.grad.isfinite().all() and z_t.grad.abs().sum() > 0),
            "weight_grads": sum(g is not None and bool(g.isfinite().all()) for g in grads),
            "trainable": len(grads),
        }
    ok = all(r["out_finite"] and r["input_grad_finite"] for r in res.values()) and all(
        res[k]["weight_grads"] == res[k]["trainable"] for k in ("none", "model")
    )
    text = ", ".join(f"{k}: {r['weight_grads']}/{r['trainable']} weight grads" for k, r in res.items())
    if not CUDA:
        raise Skip(f"no CUDA (ran on the CPU: {text})", res)
    return ok, text + ", input grads finite" if ok else text, res


def memory_check(dev: str = "cuda", runs: dict | None = None):
    """The CPU benchmark's configurations and cases, their peak allocated CUDA memory beside the CPU's tensor peak.
    PASS: every case measured, and one backward per graph (the trainer's SAD) needs less than one backward of the
    summed loss in config C, where the CPU saw its largest saving (2.9x); the rest is recorded, not judged."""
    if dev == "cuda" and not CUDA:
        raise Skip("no CUDA", {})
    from teasr_cli.sad import SADConfig, sad_losses

    spec = importlib.util.spec_from_file_location("train_memory", ROOT / "benchmarks" / "train_memory.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = bench  # its dataclass looks its module up while the module runs
    spec.loader.exec_module(bench)
    runs = runs or json.loads((ROOT / "benchmarks" / "train_memory.json").read_text())["runs"]
    cuda = dev == "cuda"
    res = {}
    for name, run in runs.items():
        if "malloc" in name:  # the same tensors as run A, another allocator: nothing new on a GPU
            continue
        bc = bench.BenchConfig(**run["config"])
        for case in run["cases"]:
            if case["case"] not in ("lora-flow", "sad", "sad-one-backward"):
                continue
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            prior, codec, x0, z0, z_lq = bench._setup(bc)
            model = bench._student(prior, bc).to(dev)
            x0, z0, z_lq = x0.to(dev), z0.to(dev), z_lq.to(dev)
            flow_only, one = case["case"] == "lora-flow", case["case"] == "sad-one-backward"
            sad_cfg = SADConfig(
                **({"lambda_cons": 0.0, "lambda_data": 0.0, "lambda_adv": 0.0, "lambda_rect": 0.0} if flow_only else {})
            )
            lpips = None if flow_only else bench._lpips(bc)
            lpips = lpips.to(dev) if lpips is not None else None
            trainable = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(trainable, lr=5e-5, betas=(0.9, 0.99))
            for i in range(2):  # as the CPU benchmark: the first step allocates AdamW's state
                draws = {k: v.to(dev) for k, v in bench._draws(z0.shape[1:], sad_cfg, bc.batch, i).items()}
                out = sad_losses(
                    model,
                    z0,
                    z_lq,
                    draws,
                    sad_cfg,
                    decode=codec.decode,
                    x0=x0,
                    lpips=lpips,
                    backward=None if one else torch.Tensor.backward,
                )
                if one:
                    out["loss"].backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
            res[f"{name} / {case['case']}"] = {
                "gpu_peak_mib": peak,
                "cpu_tensor_peak_mib": case["tensor_peak_mib"],
                "gpu_over_cpu": peak / case["tensor_peak_mib"] if cuda else None,
                "loss": float(out["loss"].detach()),
            }
            del model, opt, prior, lpips, out
    configs = [k.rsplit(" / ", 1)[0] for k in res if k.endswith(" / sad")]
    ratio = {
        c: {
            w: (res[f"{c} / sad-one-backward"][w] / res[f"{c} / sad"][w]) if res[f"{c} / sad"][w] else None
            for w in ("gpu_peak_mib", "cpu_tensor_peak_mib")
        }
        for c in configs
        if f"{c} / sad-one-backward" in res
    }
    detail = {"cases": res, "one_backward_over_sad": ratio}
    if not cuda:
        raise Skip(f"not on CUDA (ran {len(res)} cases on the {dev})", detail)
    text = "; ".join(
        f"{c.split(':')[0]}: one-backward/sad {r['gpu_peak_mib']:.2f} on GPU vs {r['cpu_tensor_peak_mib']:.2f} on CPU"
        for c, r in ratio.items()
    )
    c_run = next((c for c in ratio if c.startswith("C")), None)
    ok = (
        len(res) > 0
        and all(math.isfinite(v["loss"]) for v in res.values())
        and (c_run is None or ratio[c_run]["gpu_peak_mib"] > 1)
    )
    return ok, text, detail


# without CUDA: run C's cases at a size a CPU does in seconds, so the check's code is tried before a GPU is spent
TINY_MEMORY_RUN = {
    name + " (tiny)": {
        **run,
        "config": {
            **run["config"],
            "hidden_size": 64,
            "depth": 2,
            "num_heads": 2,
            "crop": 64,
            "batch": 1,
            "lora_rank": 4,
            "threads": 1,
        },
    }
    for name, run in json.loads((ROOT / "benchmarks/train_memory.json").read_text())["runs"].items()
    if name.startswith("C")
}

CHECKS = {
    "upscale-fp32": lambda: upscale_check("fp32", 128 if CUDA else 48),
    "upscale-bf16": lambda: upscale_check("bf16", 128 if CUDA else 48),
    "sad-bf16": sad_check,
    "accelerate-launch": accelerate_check,
    "qwen-offload": qwen_check,
    "sad-memory": lambda: memory_check() if CUDA else memory_check("cpu", TINY_MEMORY_RUN),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="write every check's status, line and details here")
    ap.add_argument("--only", nargs="*", default=None, choices=list(CHECKS))
    args = ap.parse_args(argv)
    results = {}
    for name, fn in CHECKS.items():
        if args.only is not None and name not in args.only:
            continue
        t = time.time()
        try:
            ok, text, detail = fn()
            status = "PASS" if ok else "FAIL"
        except Skip as s:
            status, text, detail = "SKIP", s.args[0], s.args[1] if len(s.args) > 1 else {}
        except Exception as e:  # one broken check must not cost the others (nor the training after them)
            traceback.print_exc()
            status, text, detail = "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", {}
        results[name] = {"status": status, "line": text, "seconds": round(time.time() - t, 1), "detail": detail}
        print(f"{status} {name}: {text} ({results[name]['seconds']} s)", flush=True)
        if args.json:  # after each check: a kill at the time limit keeps the ones done
            Path(args.json).write_text(
                json.dumps(
                    {
                        "cuda": CUDA,
                        "device": torch.cuda.get_device_name() if CUDA else "cpu",
                        "torch": torch.__version__,
                        "checks": results,
                    },
                    indent=1,
                )
            )
    return 1 if any(r["status"] == "FAIL" for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
