"""Training loop: stage `prior` (conditional flow matching, all weights), stage `sad` (SAD + TAR, LoRA on the
condition branch) and stage `regress` (the plain one-pass regression baseline: MSE + LPIPS, all weights), with
accelerate (one or many processes), gradient accumulation, EMA and exact resume."""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from teasr_cli.codecs import bicubic_up, build_codec, encode_lq
from teasr_cli.data import HQImages, list_images, sample_index
from teasr_cli.degrade import LR_KINDS, make_lq
from teasr_cli.errors import TeasrError
from teasr_cli.folders import BACKBONES, backbone, load_pretrained
from teasr_cli.imageio import atomic_path, write_text_atomic
from teasr_cli.loader import batch_stream
from teasr_cli.metrics import LPIPS
from teasr_cli.runtime import set_threads
from teasr_cli.sad import SADConfig, draw_sample, sad_losses
from teasr_cli.sampler import sample

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, from PyPI (a dependency on 3.10 only)
    import tomli as tomllib


@dataclass
class TrainConfig:
    data: str = ""
    out: str = "runs/teasr"
    stage: str = "prior"  # "prior" | "sad" | "regress"
    backbone: str = "native"  # "native" | "qwen-image" (base from `base`; only stage sad)
    base: str = "Qwen/Qwen-Image-2512"  # qwen-image: Hub repo "org/name[@revision]", or "tiny" (tests, CPU smoke runs)
    init: str | None = None  # model folder to start from (required for sad: the prior)
    model: dict = field(default_factory=dict)  # DiTConfig fields for a new prior
    codec: dict = field(default_factory=lambda: {"type": "pixel-unshuffle", "factor": 4, "scale": 1.0})
    scale: int = 4
    steps: int = 1000  # optimizer steps
    batch_size: int = 4  # per process, per micro-batch
    grad_accum: int = 1
    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    warmup: int = 0
    # "linear": after warmup the rate falls to 0 at `steps`, so that a run's last weights (the ones judged) are
    # annealed rather than a snapshot of a noisy constant-rate walk.
    lr_schedule: str = "constant"  # "constant" | "linear"
    lora_rank: int = 128
    lora_alpha: float = 128.0
    # sad: the LoRA factors' own rate (0 = lr). The weights that train in full (the condition trunk and embedders,
    # the decoder) can then take a conv net's rate while the LoRA keeps the small one it is stable at.
    lora_lr: float = 0.0
    train_head: bool = False  # sad: the conv head trains too (the LoRA alone cannot mend its token grid)
    ema: float = 0.0  # EMA decay of trainable weights (0 = off)
    mixed_precision: str = "no"  # "no" | "bf16" | "fp16" (GPU)
    gradient_checkpointing: bool = False
    crop: int = 256  # HQ crop side (pixels)
    degradation: str | dict = "realesrgan"  # "realesrgan" | "mild" | "bicubic", or a {name: weight} mixture
    small_images: str = "skip"  # "skip" | "pad"
    image_cache: int = 64  # decoded photos kept in memory per process (LRU; 0 = read every time)
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 200
    keep_last: int = 3
    sample_every: int = 500  # sample grid PNG (0 = off)
    lpips: str = "alex"  # LPIPS net for the data loss ("" = MSE only)
    threads: int | None = None
    workers: int = 0  # data-loading processes (0 = the main process); batches do not depend on it
    # Time budgets (0 = none): the run stops after the step that crosses one, with a checkpoint and an export,
    # so equal-compute studies and bounded GPU bursts are one command. CPU time is summed over resumes and
    # counts what the process used, so a run on a shared machine is not cut short by the others' load.
    max_minutes: float = 0.0
    max_cpu_minutes: float = 0.0
    sad: SADConfig = field(default_factory=SADConfig)

    @classmethod
    def load(cls, path: str | None = None, **overrides) -> "TrainConfig":
        """Recipe TOML (flat keys + a [sad] table) with CLI overrides on top; unknown keys are errors."""
        raw: dict = {}
        if path:
            try:
                raw = tomllib.loads(Path(path).read_text())
            except (OSError, tomllib.TOMLDecodeError) as e:
                raise TeasrError(f"cannot read recipe {path}: {e}") from None
        raw.update({k: v for k, v in overrides.items() if v is not None and k != "sad"})
        stages = raw.pop("stages", {})  # [stages.prior] / [stages.sad]: keys for one stage only
        raw = {
            **raw,
            **stages.get(raw.get("stage", "prior"), {}),
            **{k: v for k, v in overrides.items() if v is not None and k not in ("sad", "stages")},
        }
        sad = {**raw.pop("sad", {}), **(overrides.get("sad") or {})}
        known = {f.name for f in fields(cls)}
        bad = sorted(set(raw) - known) + sorted(f"sad.{k}" for k in set(sad) - {f.name for f in fields(SADConfig)})
        if bad:
            raise TeasrError(f"unknown training config keys: {', '.join(bad)}")
        if "betas" in raw:
            raw["betas"] = tuple(raw["betas"])
        if "last_steps" in sad:
            sad["last_steps"] = tuple(sad["last_steps"])
        cfg = cls(**raw, sad=SADConfig(**sad))
        if cfg.stage not in ("prior", "sad", "regress"):
            raise TeasrError(f"--stage must be prior, sad or regress, not {cfg.stage!r}")
        if cfg.backbone not in BACKBONES:
            raise TeasrError(f"--backbone must be one of {', '.join(BACKBONES)}, not {cfg.backbone!r}")
        backbone(cfg.backbone).check(cfg)
        if not valid_degradation(cfg.degradation):
            raise TeasrError(
                f"degradation must be one of {', '.join(LR_KINDS)} or a mixture {{name: weight}} "
                f"of them with non-negative weights, not {cfg.degradation!r}"
            )
        if cfg.lr_schedule not in ("constant", "linear"):
            raise TeasrError(f"lr_schedule must be constant or linear, not {cfg.lr_schedule!r}")
        if cfg.lora_lr < 0:
            raise TeasrError(f"lora_lr must be >= 0 (0 = lr), not {cfg.lora_lr}")
        if not cfg.sad.last_steps or not all(isinstance(n, int) and n >= 1 for n in cfg.sad.last_steps):
            raise TeasrError(f"sad.last_steps must be step counts >= 1, not {list(cfg.sad.last_steps)!r}")
        if cfg.crop % (cfg.scale * 8):
            raise TeasrError(f"crop {cfg.crop} must be a multiple of {cfg.scale * 8}")
        return cfg

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- checkpoints (safetensors only)


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Optimizer state as (tensors, json-able scalars) so it can live in safetensors."""
    sd = opt.state_dict()
    tensors, scalars = {}, {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.contiguous()
            else:
                scalars["state"].setdefault(str(pid), {})[k] = v
    return tensors, scalars


def _unflatten_optimizer(tensors: dict, scalars: dict) -> dict:
    state: dict = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for pid, st in scalars["state"].items():
        state.setdefault(int(pid), {}).update(st)
    return {"state": state, "param_groups": scalars["param_groups"]}


def save_checkpoint(run: Path, step: int, model, opt, ema: dict | None, keep_last: int) -> Path:
    """ckpt-STEP/: trainable weights, optimizer, EMA, RNG, written to a temp folder then renamed (atomic)."""
    final = run / f"ckpt-{step:07d}"
    with atomic_path(final) as tmp:
        tmp.mkdir(parents=True)
        trainable = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, tmp / "trainable.safetensors")
        opt_t, opt_s = _flatten_optimizer(opt)
        save_file(opt_t, tmp / "optimizer.safetensors")
        if ema is not None:
            save_file({k: v.contiguous() for k, v in ema.items()}, tmp / "ema.safetensors")
        save_file({"torch_rng": torch.get_rng_state()}, tmp / "rng.safetensors")
        (tmp / "state.json").write_text(json.dumps({"step": step, "optimizer": opt_s}))
    for old in sorted(run.glob("ckpt-*"))[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(run: Path) -> Path | None:
    done = [p for p in sorted(run.glob("ckpt-*")) if (p / "state.json").exists()]
    return done[-1] if done else None


def load_checkpoint(ckpt: Path, model, opt, ema: dict | None) -> int:
    params = dict(model.named_parameters())
    for n, v in load_file(ckpt / "trainable.safetensors").items():
        params[n].data.copy_(v)
    state = json.loads((ckpt / "state.json").read_text())
    opt.load_state_dict(_unflatten_optimizer(load_file(ckpt / "optimizer.safetensors"), state["optimizer"]))
    if ema is not None and (ckpt / "ema.safetensors").exists():
        ema.update(load_file(ckpt / "ema.safetensors"))
    torch.set_rng_state(load_file(ckpt / "rng.safetensors")["torch_rng"])
    return state["step"]


# ----------------------------------------------------------------------------- model set-up


def build_model(cfg: TrainConfig) -> tuple[torch.nn.Module, dict]:
    """(model, model-folder config). prior: new or --init; sad: --init prior (or a backbone's own base) + LoRA on
    the condition branch."""
    bb = backbone(cfg.backbone)
    dtype = bb.weights_dtype(cfg.mixed_precision)
    if cfg.init:
        model, mcfg = load_pretrained(cfg.init, dtype=dtype)
        model, mcfg = bb.grow(model, mcfg, cfg)
    else:
        mcfg = bb.new_config(cfg)
        model = bb.build(mcfg, dtype=dtype)
    if cfg.stage == "sad":
        bb.add_cond_lora(model, cfg.lora_rank, cfg.lora_alpha)
        if cfg.train_head:  # the conv layers after the DiT: the plain form's head, the hybrid's decoder
            heads = [getattr(model, k, None) for k in ("head", "decoder", "decoder_out")]
            if not any(heads):
                raise TeasrError(f"train_head needs a model with a conv head or decoder; {cfg.init} has none")
            for m in filter(None, heads):
                m.requires_grad_(True)
    else:
        model.requires_grad_(True)
    model.train()  # load_pretrained gives eval(); gradient checkpointing only runs in training mode
    model.gradient_checkpointing = cfg.gradient_checkpointing
    return model, mcfg


def make_optimizer(model, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable weights: one group at `lr`, or, with a distinct `lora_lr`, the LoRA factors in a
    second group (the first group's rate is the one logged)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for _, p in named], "lr": cfg.lr}]
    if cfg.lora_lr and cfg.lora_lr != cfg.lr:
        groups = [
            {"params": [p for n, p in named if "lora_" not in n], "lr": cfg.lr},
            {"params": [p for n, p in named if "lora_" in n], "lr": cfg.lora_lr},
        ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def export_model(
    model,
    mcfg: dict,
    folder: Path,
    ema: dict | None = None,
    meta: dict | None = None,
    dtype: torch.dtype | None = None,
    lora_rank: int | None = None,
) -> Path:
    """A plain model folder for `teasr upscale`: EMA weights if any, written by the model's backbone."""
    bb = backbone(mcfg.get("backbone", "native"))
    return bb.export(model, {**mcfg, **(meta or {})}, folder, ema, lora_rank, dtype)


def export_checkpoint(
    path: Path, out: Path, use_ema: bool = True, dtype: torch.dtype | None = None, lora_rank: int | None = None
) -> Path:
    """`teasr train --export`: a run folder (its latest checkpoint) or one checkpoint -> a plain model folder."""
    path = Path(path)
    ckpt = path if (path / "state.json").exists() else latest_checkpoint(path)
    if ckpt is None:
        raise TeasrError(f"{path}: no checkpoint to export (expected a run folder with ckpt-* or a ckpt-* folder)")
    run = ckpt.parent
    try:
        cfg = TrainConfig.load(None, **{k: v for k, v in json.loads((run / "train_config.json").read_text()).items()})
    except (OSError, ValueError) as e:
        raise TeasrError(f"cannot read {run / 'train_config.json'}: {e}") from None
    model, mcfg = build_model(cfg)
    opt = make_optimizer(model, cfg)
    ema = {} if use_ema and cfg.ema > 0 else None
    step = load_checkpoint(ckpt, model, opt, ema)
    meta = {"trained": {"stage": cfg.stage, "steps": step, "data": cfg.data}}
    return export_model(model, mcfg, Path(out), ema or None, meta, dtype=dtype, lora_rank=lora_rank)


# ----------------------------------------------------------------------------- the loop


def make_batch(images, cfg: TrainConfig, first_sample: int, n: int, latent_shape, device):
    """HQ crops, their LQ, and per-sample draws for global samples first_sample .. first_sample+n-1.

    Every random choice of a sample comes from a generator seeded by (seed, sample number), so the
    batch layout (accumulation, processes, resume) never changes what a sample sees.
    """
    hq, lq, draws = [], [], []
    for k in range(first_sample, first_sample + n):
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + k)
        x = images.crop_at(sample_index(cfg.seed, k, len(images)), g)
        hq.append(x)
        lq.append(make_lq(x[None], pick_degradation(cfg.degradation, g), g, cfg.scale)[0])
        draws.append(draw_sample(latent_shape, cfg.sad, g))
    stacked = {k: torch.stack([d[k] for d in draws]).to(device) for k in draws[0]}
    return torch.stack(hq).to(device), torch.stack(lq).to(device), stacked


def valid_degradation(d) -> bool:
    mix = {d: 1.0} if isinstance(d, str) else d
    try:
        return (
            isinstance(mix, dict)
            and all(k in LR_KINDS for k in mix)
            and all(float(v) >= 0 for v in mix.values())
            and sum(map(float, mix.values())) > 0
        )
    except (TypeError, ValueError):
        return False


def pick_degradation(degradation: str | dict, g: torch.Generator) -> str:
    """A preset name, or one drawn from a {name: weight} mixture (seen clean photos must stay clean)."""
    if isinstance(degradation, str):
        return degradation
    names = list(degradation)
    w = torch.tensor([float(degradation[k]) for k in names])
    return names[int(torch.multinomial(w / w.sum(), 1, generator=g))]


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """The rate at optimizer step `step` (0-based) over cfg.lr: linear warmup, then constant or linear to 0."""
    warm = min(1.0, (step + 1) / cfg.warmup) if cfg.warmup else 1.0
    if cfg.lr_schedule == "linear":
        return warm * max(0.0, 1.0 - step / cfg.steps)
    return warm


def stage_sad_config(cfg: TrainConfig) -> SADConfig:
    """The prior stage is plain conditional flow matching, the regress stage only the pixel anchor (MSE + LPIPS
    on the one-pass output): every other term off."""
    off = {"lambda_cons": 0.0, "lambda_adv": 0.0, "lambda_rect": 0.0, "lambda_last": 0.0}
    if cfg.stage == "prior":
        return SADConfig(**{**asdict(cfg.sad), **off, "lambda_data": 0.0})
    if cfg.stage == "regress":
        return SADConfig(**{**asdict(cfg.sad), **off, "lambda_flow": 0.0, "lambda_data": 1.0})
    return cfg.sad


def train(
    cfg: TrainConfig,
    resume: bool = False,
    callback: Callable[[dict], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> Path:
    """Run (or resume) training; returns the exported model folder. `callback(record)` gets each log record."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    set_threads(cfg.threads)
    acc = Accelerator(
        gradient_accumulation_steps=cfg.grad_accum,
        mixed_precision=cfg.mixed_precision,
        cpu=not torch.cuda.is_available(),
    )
    set_seed(cfg.seed + acc.process_index)  # per-rank seed for anything not drawn per sample
    run = Path(cfg.out)
    ckpt = latest_checkpoint(run) if resume else None
    if resume and ckpt is None and acc.is_main_process and any(run.glob("ckpt-*")):
        raise TeasrError(f"no complete checkpoint in {run}")
    if not resume and latest_checkpoint(run) is not None:
        raise TeasrError(f"{run} already has checkpoints; pass --resume to continue it or choose another --out")
    run.mkdir(parents=True, exist_ok=True)
    images = HQImages(list_images(cfg.data), cfg.crop, cfg.small_images, cfg.image_cache)
    model, mcfg = build_model(cfg)
    codec = (getattr(model, "codec", None) or build_codec(mcfg["codec"])).to(acc.device)
    sad_cfg = stage_sad_config(cfg)
    lpips = None
    if cfg.stage != "prior" and cfg.lpips and sad_cfg.lambda_data > 0 and sad_cfg.lambda_lpips > 0:
        lpips = LPIPS(net=cfg.lpips).to(acc.device).eval().requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(model, cfg)
    rates = [g["lr"] for g in opt.param_groups]
    ema = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad} if cfg.ema > 0 else None
    step = load_checkpoint(ckpt, model, opt, ema) if ckpt else 0
    for group, rate in zip(opt.param_groups, rates):  # the recipe's rates, not those saved with the optimizer
        group["lr"] = group["initial_lr"] = rate
    sched = torch.optim.lr_scheduler.LambdaLR(opt, partial(lr_factor, cfg), last_epoch=step - 1 if step else -1)
    dmodel, opt = acc.prepare(model, opt)
    if ema is not None:  # beside the weights, which prepare() moved to the GPU: one update kernel per tensor
        ema = {n: v.to(acc.device) for n, v in ema.items()}
    if acc.is_main_process:
        (run / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=2, default=str))
        if step:
            _truncate_log(run, step)
            _log(run, {"event": "resume", "from_step": step}, callback)
        else:
            _log(
                run,
                {
                    "event": "start",
                    "config": cfg.to_dict(),
                    "trainable_params": sum(p.numel() for p in trainable),
                    "total_params": sum(p.numel() for p in model.parameters()),
                    "images": len(images),
                },
                callback,
            )
    down = codec.downsample
    latent_shape = (codec.latent_channels, cfg.crop // down, cfg.crop // down)
    per_step = cfg.batch_size * cfg.grad_accum * acc.num_processes
    sums: dict = {}
    t0, logged_at = time.time(), step
    wall0, cpu0 = time.time(), time.process_time() - prior_cpu_seconds(run, step)
    over_budget = lambda: (
        (cfg.max_minutes and time.time() - wall0 >= 60 * cfg.max_minutes)  # noqa: E731
        or (cfg.max_cpu_minutes and time.process_time() - cpu0 >= 60 * cfg.max_cpu_minutes)
    )
    batches = batch_stream(
        partial(make_batch, images, cfg, latent_shape=latent_shape),
        cfg.batch_size,
        step * cfg.grad_accum,
        acc.num_processes,
        acc.process_index,
        cfg.workers,
        acc.device,
    )
    while step < cfg.steps:
        for micro in range(cfg.grad_accum):
            hq, lq, draws = next(batches)
            with acc.accumulate(dmodel), acc.autocast():
                x0 = hq * 2 - 1
                z0, z_lq = codec.encode(x0), encode_lq(codec, lq * 2 - 1, cfg.scale)
                # one backward per graph (peak memory of one graph); accelerate divides each by grad_accum,
                # so the accumulated gradient is the mean over the big batch
                losses = sad_losses(
                    dmodel,
                    z0,
                    z_lq,
                    draws,
                    sad_cfg,
                    decode=codec.decode,
                    x0=x0,
                    lpips=lpips,
                    backward=acc.backward,
                    no_sync=lambda: acc.no_sync(dmodel),
                )
                if acc.sync_gradients and cfg.grad_clip > 0:
                    acc.clip_grad_norm_(trainable, cfg.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
        lr = sched.get_last_lr()[0]  # this step's rate, logged below
        sched.step()
        step += 1
        if ema is not None:
            # warm-up: early on the average must not be dominated by the initial (zero-output) weights
            decay = min(cfg.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                for n, p in model.named_parameters():
                    if n in ema:
                        ema[n].lerp_(p.detach(), 1 - decay)
        if acc.is_main_process:
            if step % cfg.log_every == 0 or step == cfg.steps:
                dt = time.time() - t0
                rec = {
                    "step": step,
                    **{k: v / (step - logged_at) for k, v in sums.items()},
                    "lr": lr,
                    "it_s": (step - logged_at) / max(dt, 1e-9),
                    "samples_s": (step - logged_at) * per_step / max(dt, 1e-9),
                    "skipped_images": len(images.skipped),
                    "cpu_s": round(time.process_time() - cpu0, 1),
                }
                _log(run, rec, callback)
                sums, t0, logged_at = {}, time.time(), step
            if cfg.sample_every and step % cfg.sample_every == 0:
                save_sample_grid(model, codec, images, cfg, run / "samples" / f"step-{step:07d}.png")
            if step % cfg.ckpt_every == 0 or step == cfg.steps:
                save_checkpoint(run, step, model, opt, ema, cfg.keep_last)
        acc.wait_for_everyone()
        if over_budget():  # a finished run: checkpoint and export as at the last step
            if acc.is_main_process:
                if step % cfg.ckpt_every and step != cfg.steps:
                    save_checkpoint(run, step, model, opt, ema, cfg.keep_last)
                _log(run, {"event": "budget", "step": step, "cpu_s": round(time.process_time() - cpu0, 1)}, callback)
            break
        if stop is not None and stop():  # e.g. Ctrl-C: keep the work done so far, --resume continues from here
            if acc.is_main_process and step % cfg.ckpt_every:
                save_checkpoint(run, step, model, opt, ema, cfg.keep_last)
            break
    out = run / "model"
    if acc.is_main_process and (step >= cfg.steps or over_budget()):
        export_model(model, mcfg, out, ema, {"trained": {"stage": cfg.stage, "steps": step, "data": cfg.data}})
        _log(run, {"event": "export", "step": step, "model": str(out)}, callback)
    acc.wait_for_everyone()
    acc.end_training()
    return out


def prior_cpu_seconds(run: Path, step: int) -> float:
    """CPU seconds the earlier sessions of this run spent up to `step` (the last `cpu_s` logged by then)."""
    log = run / "metrics.jsonl"
    if not step or not log.exists():
        return 0.0
    recs = [json.loads(ln) for ln in log.read_text().splitlines()]
    return max((r["cpu_s"] for r in recs if "cpu_s" in r and r.get("step", 0) <= step), default=0.0)


def _truncate_log(run: Path, step: int):
    """Drop the records a killed run logged after its last checkpoint: the resumed run logs those steps again."""
    log = run / "metrics.jsonl"
    if not log.exists():
        return
    lines = log.read_text().splitlines(keepends=True)
    keep = [ln for ln in lines if json.loads(ln).get("step", 0) <= step]
    if len(keep) < len(lines):
        write_text_atomic(log, "".join(keep))


def _log(run: Path, rec: dict, callback):
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"time": time.time(), **rec}, default=str) + "\n")
    if callback is not None:
        callback(rec)


@torch.no_grad()
def save_sample_grid(model, codec, images, cfg: TrainConfig, path: Path, n: int = 2) -> Path:
    """Rows of LQ (bicubic x4) | 1 step | 4 steps | HQ on fixed samples, so progress can be seen."""
    was_training = model.training
    model.eval()
    hq, lq, _ = make_batch(images, cfg, 0, n, (1, 1, 1), next(model.parameters()).device)
    up = bicubic_up(lq * 2 - 1, cfg.scale)
    z_lq = codec.encode(up)
    noise = torch.randn(z_lq.shape, generator=torch.Generator().manual_seed(0)).to(z_lq.device)
    cols = [up] + [codec.decode(sample(model, noise, z_lq, k)) for k in (1, 4)] + [hq * 2 - 1]
    grid = torch.cat([torch.cat(list(c.clamp(-1, 1)), dim=1) for c in cols], dim=2)  # (3, n*H, 4*W)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = ((grid + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp)
    model.train(was_training)
    return path
