"""One bounded training burst of the campaign (train/gpu_burst.sh runs it on the device; --dry-run on a CPU).

Starts from train/checkpoints/campaign/ when it holds a model, else from the shipped teasr_cli/weights/; takes what is
trained (stage, losses, degradations, LoRA, EMA) from the campaign's train_config.json and how (batch, crop, lr,
bf16, loader workers) from the GPU recipe; trains for --max-minutes of wall time (the trainer checkpoints and
exports when the budget is crossed) and writes under --out:
  model/      config.json, metrics.jsonl and the EMA's model.safetensors (fp16) in parts of at most 15 MiB
              (model.safetensors.00, .01, ...: the device returns files of at most 16 MiB)
  burst.json  throughput (samples/s of the training and of the loader alone), GPU memory peak, steps, timings,
              the training config and the weights' SHA-256; train/fold_burst.py makes a campaign folder of it all

    python train/gpu_train.py --out $OUT --max-minutes 6
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from teasr_cli import trainer  # noqa: E402
from teasr_cli.codecs import build_codec  # noqa: E402
from teasr_cli.data import HQImages, list_images  # noqa: E402
from teasr_cli.errors import TeasrError  # noqa: E402
from teasr_cli.loader import batch_stream  # noqa: E402
from teasr_cli.sad import LOSS_TERMS  # noqa: E402

CAMPAIGN = ROOT / "train/checkpoints/campaign"
SHIPPED = ROOT / "teasr_cli/weights"
RECIPE = ROOT / "train/recipes/campaign-gpu.toml"
PACK = ROOT / "packs/gpu"
# what the campaign decides (the objective); everything else (the machine's settings) comes from the GPU recipe
CAMPAIGN_KEYS = (
    "stage",
    "backbone",
    "scale",
    "degradation",
    "lora_rank",
    "lora_alpha",
    "train_head",
    "lpips",
    "ema",
    "small_images",
    "sad",
)
# a CPU rehearsal: the same code paths (loader workers included) at a size 2 cores run in seconds
DRY = {
    "batch_size": 2,
    "crop": 64,
    "workers": 2,
    "mixed_precision": "no",
    "log_every": 1,
    "ckpt_every": 1000,
    "threads": 1,
}


def start_point(campaign: Path = CAMPAIGN, shipped: Path = SHIPPED) -> tuple[Path, dict]:
    """(model folder to --init from, the campaign's train_config.json or {})."""
    if (campaign / "config.json").exists() and (campaign / "model.safetensors").exists():
        tc = campaign / "train_config.json"
        return campaign, json.loads(tc.read_text()) if tc.exists() else {}
    return shipped, {}


def burst_config(
    recipe: Path, init: Path, campaign_cfg: dict, data: str, out: str, max_minutes: float, dry_run: bool = False
) -> trainer.TrainConfig:
    cfg = trainer.TrainConfig.load(str(recipe), data=data, out=out, init=str(init), max_minutes=max_minutes)
    chosen = {k: campaign_cfg[k] for k in CAMPAIGN_KEYS if k in campaign_cfg}
    # through load() again: the campaign's choices get the same validation as any recipe
    cfg = trainer.TrainConfig.load(None, **{**cfg.to_dict(), **chosen, **(DRY if dry_run else {})})
    if not dry_run:  # leave the main process and the GPU's feeder thread a core each
        cfg.workers = max(0, min(cfg.workers, (os.cpu_count() or 1) - 2))
    return cfg


def shm_workers(batch_size: int, crop: int, free: int, prefetch: int = 4) -> int:
    """Workers hand batches over in shared memory; a container's /dev/shm can be as small as 64 MiB, and a worker
    that cannot write its batch kills the run. The most workers whose batches in flight (x prefetch) fill at most
    half of `free` bytes."""
    batch = batch_size * 3 * crop**2 * 4 * 1.25  # HQ + LQ (1/16) + the draws, float32
    return int(free * 0.5 // (batch * prefetch))


def fit_workers(cfg: trainer.TrainConfig, shm: str = "/dev/shm") -> dict:
    try:
        free = shutil.disk_usage(shm).free
    except OSError:  # no /dev/shm: the platform shares memory some other way
        return {"shm_free_gib": None, "workers": cfg.workers}
    cfg.workers = min(cfg.workers, shm_workers(cfg.batch_size, cfg.crop, free))
    return {"shm_free_gib": round(free / 2**30, 2), "workers": cfg.workers}


def loader_rate(cfg: trainer.TrainConfig, seconds: float, latent_shape) -> float:
    """Samples/s of the data loading alone (the same workers and prefetch): the ceiling the GPU can be fed at."""
    images = HQImages(list_images(cfg.data), cfg.crop, cfg.small_images)
    stream = batch_stream(
        partial(trainer.make_batch, images, cfg, latent_shape=latent_shape), cfg.batch_size, 10**6, workers=cfg.workers
    )  # samples the run will not reach soon; warm-up batch untimed
    next(stream)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        next(stream)
        n += cfg.batch_size
    rate = n / (time.perf_counter() - t0)
    stream.close()
    return rate


def split(path: Path, part: int) -> dict:
    """path -> path.00, path.01, ... of at most `part` bytes each (the original removed); its SHA-256 and parts."""
    data = path.read_bytes()
    names = []
    for i in range(0, max(len(data), 1), part):
        name = f"{path.name}.{i // part:02d}"
        (path.parent / name).write_bytes(data[i : i + part])
        names.append(name)
    path.unlink()
    return {"file": path.name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "parts": names}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="where model/ and burst.json go ($OUT on the device)")
    ap.add_argument("--max-minutes", type=float, required=True, help="wall-time budget of the training loop")
    ap.add_argument("--recipe", default=str(RECIPE))
    ap.add_argument("--data", default=str(PACK), help="training photos (train/make_pack.py's pack)")
    ap.add_argument("--campaign", default=str(CAMPAIGN), help="the campaign folder to continue, if it holds a model")
    ap.add_argument("--run", default=None, help="run folder (checkpoints); default: a temp folder")
    ap.add_argument("--loader-seconds", type=float, default=15.0, help="time the loader alone for this long first")
    ap.add_argument("--dry-run", action="store_true", help="CPU rehearsal: tiny batch and crop, 2 workers")
    ap.add_argument("--part-mib", type=int, default=15, help="largest file written under --out, MiB")
    args = ap.parse_args(argv)
    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Path(args.run or tempfile.mkdtemp(prefix="teasr-burst-"))
    init, campaign_cfg = start_point(Path(args.campaign))
    try:
        list_images(args.data)
        cfg = burst_config(Path(args.recipe), init, campaign_cfg, args.data, str(run), args.max_minutes, args.dry_run)
    except TeasrError as e:
        raise SystemExit(f"gpu_train: {e}") from None
    shm = fit_workers(cfg)
    cuda = torch.cuda.is_available()
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True  # the fp32 parts outside autocast (EMA, optimizer)
        torch.backends.cudnn.benchmark = True  # one crop size: pick the fastest conv kernels once
    elif cfg.mixed_precision != "no":
        cfg.mixed_precision = "no"  # bf16 autocast is the GPU's; a CPU run stays fp32
    print(
        f"burst: init {init.relative_to(ROOT) if init.is_relative_to(ROOT) else init} "
        f"({'campaign' if campaign_cfg else 'no campaign config: the recipe stage'} {cfg.stage}), "
        f"batch {cfg.batch_size}, crop {cfg.crop}, {cfg.mixed_precision}, {cfg.workers} workers, "
        f"{cfg.max_minutes} min; /dev/shm {shm['shm_free_gib']} GiB free",
        flush=True,
    )
    codec = build_codec(json.loads((init / "config.json").read_text())["codec"])
    latent = (codec.latent_channels, cfg.crop // codec.downsample, cfg.crop // codec.downsample)
    feed = loader_rate(cfg, args.loader_seconds, latent)
    print(f"burst: loader alone {feed:.1f} samples/s", flush=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t_train = time.time()

    def on_log(rec):
        if "loss" in rec:
            print(f"step {rec['step']} loss {rec['loss']:.4f} {rec['samples_s']:.1f} samples/s", flush=True)

    trainer.train(cfg, callback=on_log)
    train_s = time.time() - t_train
    recs = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    if not steps:
        raise SystemExit("gpu_train: no step finished inside the budget")
    rates = sorted(r["samples_s"] for r in steps[1:] or steps)  # the first window holds the warm-up
    folder = out / "model"
    shutil.rmtree(folder, ignore_errors=True)
    trainer.export_checkpoint(run, folder, use_ema=True, dtype=torch.float16)  # the EMA as the campaign keeps it
    shutil.copy(run / "metrics.jsonl", folder / "metrics.jsonl")
    weights = split(folder / "model.safetensors", args.part_mib * 2**20)
    burst = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__,
        "init": str(init.relative_to(ROOT) if init.is_relative_to(ROOT) else init),
        "stage": cfg.stage,
        "batch_size": cfg.batch_size,
        "crop": cfg.crop,
        "mixed_precision": cfg.mixed_precision,
        "workers": cfg.workers,
        "shm_free_gib": shm["shm_free_gib"],
        "max_minutes": cfg.max_minutes,
        "steps": steps[-1]["step"],
        "samples": steps[-1]["step"] * cfg.batch_size * cfg.grad_accum,
        "samples_s_median": rates[len(rates) // 2],
        "loader_samples_s": feed,
        "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "train_s": train_s,
        "total_s": time.time() - t_start,
        "last_loss": {k: v for k, v in steps[-1].items() if k in LOSS_TERMS},
        "weights": weights,
        "train_config": json.loads((run / "train_config.json").read_text()),
    }
    (out / "burst.json").write_text(json.dumps(burst, indent=1))
    peak = f"{burst['gpu_peak_gib']:.2f} GiB" if cuda else "n/a (CPU)"
    print(
        f"throughput: {burst['samples_s_median']:.1f} samples/s (loader alone {feed:.1f}), GPU memory peak {peak}, "
        f"{burst['steps']} steps in {train_s:.0f} s",
        flush=True,
    )
    if args.run is None:
        shutil.rmtree(run, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
