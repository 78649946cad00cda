"""Peak memory and time of one training step on the CPU: plain LoRA flow matching vs SAD vs an OSEDiff-style step.

    python benchmarks/train_memory.py                 # the mid-size config below, results -> train_memory.json
    python benchmarks/train_memory.py --quick         # tiny config: a smoke test of the script itself
    python benchmarks/train_memory.py --gradient-checkpointing

Cases, all on the same native backbone (random prior weights; the numbers do not depend on what they are):
  lora-flow  condition-branch LoRA, flow matching only (stage sad with every lambda but flow = 0)
  sad        condition-branch LoRA, every SAD + TAR term (LPIPS in the data term when teasr_cli.metrics has it),
             as the trainer runs it: one backward per graph (flow; consistency; data + rect, which share the
             one-step graph; adv), so only one graph is alive at a time
  sad-one-backward  the same gradient from one backward of the summed loss, so the four graphs coexist
             (how the trainer ran before; kept to show what the per-graph backward saves)
  osediff    3-model distillation: LoRA student (one-step output, MSE + LPIPS + a VSD/DMD-style term whose
             gradient comes from a frozen teacher copy and a trainable full-weight fake-score copy at a re-noised
             point), then the fake-score copy's own flow-matching loss and its AdamW step
Each case runs in a fresh process, so one case's peak cannot hide in another's; the peak is the process's
RSS high-water mark (getrusage ru_maxrss, which sees torch's allocations, unlike tracemalloc), minus that of
an idle process with the same imports, with glibc's mmap threshold fixed (see FIXED_MALLOC). A second,
allocator-independent figure, "tensor peak", adds the resident weights to the peak bytes of tensors alive during
the steps (LiveTensors). Two optimizer steps run (the first allocates AdamW's state); the time is the second's.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

CASES = ("lora-flow", "sad", "sad-one-backward", "osediff")


@dataclass
class BenchConfig:
    hidden_size: int = 512
    depth: int = 8
    num_heads: int = 8
    patch_size: int = 2
    batch: int = 2
    crop: int = 256  # HQ crop; pixel-unshuffle f=4 latent: crop/4 per side
    lora_rank: int = 32
    lpips: str = "alex"  # "" = MSE-only data terms
    gradient_checkpointing: bool = False
    threads: int = 2


# ----------------------------------------------------------------------------- one case, in this process


def _setup(cfg: BenchConfig):
    import numpy as np
    import torch
    from skimage import data as skdata

    from teasr_cli.codecs import PixelUnshuffleCodec
    from teasr_cli.degrade import bicubic_lq
    from teasr_cli.model import DiTConfig, TeasrDiT

    torch.set_num_threads(cfg.threads)
    torch.manual_seed(0)
    prior = TeasrDiT(
        DiTConfig(hidden_size=cfg.hidden_size, depth=cfg.depth, num_heads=cfg.num_heads, patch_size=cfg.patch_size)
    )
    with torch.no_grad():  # off the adaLN-Zero start, so every loss term is non-zero as with a trained prior
        for p in prior.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    # real photo crops as HQ, their bicubic x1/4 as LQ (what a training step sees)
    img = torch.from_numpy(np.asarray(skdata.astronaut()).copy()).permute(2, 0, 1).float() / 255
    hq = torch.stack([img[:, 16 * i : 16 * i + cfg.crop, 32 * i : 32 * i + cfg.crop] for i in range(cfg.batch)])
    codec = PixelUnshuffleCodec(4)
    x0 = hq * 2 - 1
    up = torch.nn.functional.interpolate(bicubic_lq(hq, 4) * 2 - 1, scale_factor=4, mode="bicubic").clamp(-1, 1)
    return prior, codec, x0, codec.encode(x0), codec.encode(up)


def _lpips(cfg: BenchConfig):
    if not cfg.lpips:
        return None
    try:
        from teasr_cli.metrics import LPIPS
    except ImportError:
        return None
    return LPIPS(net=cfg.lpips).eval().requires_grad_(False)


def _student(prior, cfg: BenchConfig):
    from teasr_cli.lora import add_lora

    model = add_lora(prior, cfg.lora_rank, cfg.lora_rank).train()
    model.gradient_checkpointing = cfg.gradient_checkpointing
    return model


def _draws(shape, cfg_sad, batch: int, step: int):
    import torch

    from teasr_cli.sad import draw_sample

    ds = [draw_sample(shape, cfg_sad, torch.Generator().manual_seed(1000 * step + i)) for i in range(batch)]
    return {k: torch.stack([d[k] for d in ds]) for k in ds[0]}


def sad_step_fn(cfg: BenchConfig, flow_only: bool, one_backward: bool = False):
    """(a) and (b): one model, the trainer's loss function, AdamW on the LoRA (+ condition embedders).
    As the trainer runs it, each graph is back-propagated as soon as it exists; `one_backward` instead
    keeps all four graphs for a single backward of the summed loss (the same gradient)."""
    import torch

    from teasr_cli.sad import SADConfig, sad_losses

    prior, codec, x0, z0, z_lq = _setup(cfg)
    model = _student(prior, cfg)
    off = dict(lambda_cons=0.0, lambda_data=0.0, lambda_adv=0.0, lambda_rect=0.0) if flow_only else {}
    sad_cfg = SADConfig(**off)
    lpips = None if flow_only else _lpips(cfg)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=5e-5, betas=(0.9, 0.99), weight_decay=0.0)

    def step(i):
        draws = _draws(z0.shape[1:], sad_cfg, cfg.batch, i)
        out = sad_losses(
            model,
            z0,
            z_lq,
            draws,
            sad_cfg,
            decode=codec.decode,
            x0=x0,
            lpips=lpips,
            backward=None if one_backward else torch.Tensor.backward,
        )
        if one_backward:
            out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return {k: float(v) for k, v in out.items()}

    return step, model, lpips


def osediff_step_fn(cfg: BenchConfig):
    """(c): LoRA student + frozen teacher copy + trainable full-weight fake-score copy with its own AdamW."""
    import torch
    import torch.nn.functional as F

    from teasr_cli.sad import data_loss, flow_loss, interpolate, one_step_fake

    prior, codec, x0, z0, z_lq = _setup(cfg)
    teacher = copy.deepcopy(prior).eval().requires_grad_(False)
    fake = copy.deepcopy(prior).train().requires_grad_(True)
    fake.gradient_checkpointing = cfg.gradient_checkpointing
    student = _student(prior, cfg)
    lpips = _lpips(cfg)
    trainable = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=5e-5, betas=(0.9, 0.99), weight_decay=0.0)
    opt_fake = torch.optim.AdamW(fake.parameters(), lr=5e-5, betas=(0.9, 0.99), weight_decay=0.0)
    b = z0.shape[0]

    def step(i):
        g = torch.Generator().manual_seed(i)
        eps, eps_t, eps_f = (torch.randn(z0.shape, generator=g) for _ in range(3))
        t, t_f = torch.rand(b, generator=g).clamp(0.02, 0.98), torch.rand(b, generator=g)
        # student: one-step output with gradient
        _, z_fake = one_step_fake(student, eps, z_lq)
        loss_data = data_loss(codec.decode(z_fake), x0, lpips, 1.0)
        # distribution matching: the real (teacher) and fake (fake-score) data estimates at a re-noised point
        with torch.no_grad():
            z_t = interpolate(z_fake.detach(), eps_t, t)
            tb = t.view(-1, 1, 1, 1)
            x_real = z_t - tb * teacher(z_t, t, z_lq, t)
            x_fake = z_t - tb * fake(z_t, t, z_lq, t)
            grad = x_fake - x_real
            grad = grad / grad.abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-6)  # DMD's normaliser
        loss_vsd = 0.5 * F.mse_loss(z_fake, (z_fake - grad).detach())
        (loss_data + loss_vsd).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        # fake-score model: flow matching on the student's (detached) outputs, full weights, own optimizer
        loss_fake = flow_loss(fake, z_fake.detach(), z_lq, eps_f, t_f)
        loss_fake.backward()
        torch.nn.utils.clip_grad_norm_(fake.parameters(), 1.0)
        opt_fake.step()
        opt_fake.zero_grad(set_to_none=True)
        return {"data": float(loss_data), "vsd": float(loss_vsd), "fake": float(loss_fake)}

    return step, student, lpips, teacher, fake


class LiveTensors:
    """Peak bytes of tensor storages created while active (every op's outputs, autograd's included), freed ones
    subtracted: what the step itself needs, independent of how malloc keeps or returns freed memory.
    `existing` tensors (weights, inputs) are counted elsewhere: in-place ops and views on them return their storage."""

    def __init__(self, existing=()):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker.add(out)
                return out

        self.mode, self.live, self.now, self.peak = Mode(), set(), 0, 0
        self.existing = {t.untyped_storage().data_ptr() for t in existing}

    def add(self, out):
        import weakref

        import torch
        from torch.utils._pytree import tree_flatten

        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key, n = st.data_ptr(), st.nbytes()
                if n and key not in self.live and key not in self.existing:
                    self.live.add(key)
                    self.now += n
                    self.peak = max(self.peak, self.now)
                    weakref.finalize(st, self._free, key, n)

    def _free(self, key, n):
        self.live.discard(key)
        self.now -= n

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self.mode.__exit__(*exc)


def _module_tensors(*mods):
    return [t for m in mods if m is not None for t in (*m.parameters(), *m.buffers())]


def _tensor_bytes(tensors):
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def _count(*mods):
    seen, total, train = set(), 0, 0
    for m in mods:
        if m is None:
            continue
        for p in m.parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            train += p.numel() if p.requires_grad else 0
    return total, train


def run_case(case: str, cfg: BenchConfig) -> dict:
    """Build and run one case here; the caller reads the peak RSS of this process."""
    import torch  # noqa: F401  (imported by every case and by "idle": part of the baseline)

    from teasr_cli import lora, sad  # noqa: F401

    try:
        from teasr_cli import metrics  # noqa: F401
    except ImportError:
        pass
    import peft  # noqa: F401

    rec = {"case": case}
    if case != "idle":
        if case == "osediff":
            step, *mods = osediff_step_fn(cfg)
        elif case == "sad-one-backward":
            step, *mods = sad_step_fn(cfg, flow_only=False, one_backward=True)
        else:
            step, *mods = sad_step_fn(cfg, flow_only=case == "lora-flow")
        lp = mods.pop(1)
        rec["params"], rec["trainable_params"] = _count(*mods)  # backbone copies (LPIPS apart)
        rec["lpips"] = lp is not None
        resident = _module_tensors(*mods, lp)
        with LiveTensors(resident) as live:  # the tracker costs microseconds per op: nothing next to a step
            step(0)  # allocates the optimizer state
            t0 = time.perf_counter()
            rec["losses"] = step(1)  # the steady state: optimizer state resident throughout
            rec["step_s"] = time.perf_counter() - t0
        rec["tensor_peak_mib"] = (_tensor_bytes(resident) + live.peak) / 2**20
    rec["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return rec


# ----------------------------------------------------------------------------- driver

# glibc raises its mmap threshold each time a large block is freed, after which big tensors come from the heap
# and freed ones stay in it: the RSS high-water mark then counts memory the step no longer uses. A fixed
# threshold keeps every large tensor in its own mapping, returned to the OS when freed.
FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def measure(case: str, cfg: BenchConfig, default_malloc: bool = False) -> dict:
    """Run one case in a fresh interpreter; its peak RSS cannot mix with another case's."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": str(cfg.threads)}
    for k in FIXED_MALLOC:
        env.pop(k, None)
    if not default_malloc:
        env.update(FIXED_MALLOC)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--case", case, "--config", json.dumps(asdict(cfg))]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=root, env=env)
    if p.returncode:
        raise RuntimeError(f"case {case} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def benchmark(cfg: BenchConfig, default_malloc: bool = False, cases=CASES, progress=None) -> dict:
    idle = measure("idle", cfg, default_malloc)
    rows = []
    for case in cases:
        r = measure(case, cfg, default_malloc)
        r["peak_mib"] = r["peak_rss_mib"] - idle["peak_rss_mib"]
        rows.append(r)
        if progress:
            progress(r)
    by = {r["case"]: r for r in rows}
    ratios = {}
    for key in ("peak_mib", "tensor_peak_mib"):
        if {"sad", "lora-flow", "osediff"} <= by.keys():
            for sad in ("sad", "sad-one-backward"):
                if sad in by:
                    ratios[f"{sad}/lora-flow ({key})"] = by[sad][key] / by["lora-flow"][key]
                    ratios[f"{sad}/osediff ({key})"] = by[sad][key] / by["osediff"][key]
    return {
        "config": asdict(cfg),
        "malloc": "glibc default" if default_malloc else FIXED_MALLOC,
        "idle_rss_mib": idle["peak_rss_mib"],
        "cases": rows,
        "ratios": ratios,
    }


def table(res: dict) -> str:
    lines = [
        "| case | peak RSS above idle (MiB) | x lora-flow | tensor peak (MiB) | x lora-flow | step (s) "
        "| backbone params (M) | trainable (M) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = next(r for r in res["cases"] if r["case"] == "lora-flow")
    for r in res["cases"]:
        lines.append(
            f"| {r['case']} | {r['peak_mib']:.0f} | {r['peak_mib'] / base['peak_mib']:.2f} | "
            f"{r['tensor_peak_mib']:.0f} | {r['tensor_peak_mib'] / base['tensor_peak_mib']:.2f} | "
            f"{r['step_s']:.1f} | {r['params'] / 1e6:.1f} | {r['trainable_params'] / 1e6:.2f} |"
        )
    return "\n".join(lines)


# the runs recorded in benchmarks/README.md ("Training memory")
WEIGHTS_DOMINATE = dict(hidden_size=1024, num_heads=16, patch_size=4, batch=1)  # as at 20B with checkpointing
RECORDED = {
    "A: hidden 512, patch 2, batch 2, checkpointing": (BenchConfig(gradient_checkpointing=True), False),
    "A with glibc's default malloc": (BenchConfig(gradient_checkpointing=True), True),
    "B: hidden 1024, patch 4, batch 1, checkpointing": (
        BenchConfig(**WEIGHTS_DOMINATE, gradient_checkpointing=True),
        False,
    ),
    "C: A without checkpointing, crop 128": (BenchConfig(crop=128), False),
}


def report(label: str, res: dict) -> str:
    cfg = res["config"]
    return (
        f"### {label}\nconfig: {json.dumps(cfg)}; malloc: {json.dumps(res['malloc'])}; "
        f"idle process RSS {res['idle_rss_mib']:.0f} MiB\n\n{table(res)}\n\n"
        + "; ".join(f"{k} = {v:.2f}" for k, v in res["ratios"].items())
        + "\n"
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", choices=("idle", *CASES), help=argparse.SUPPRESS)  # internal: one case, JSON out
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--all", action="store_true", help="the recorded runs (about 15 min on 2 idle cores) -> --out")
    ap.add_argument(
        "--only",
        default="",
        help="with --all: the recorded runs whose label starts with one of "
        "these comma-separated prefixes (e.g. 'A:,C:'); others are kept from the existing --out",
    )
    ap.add_argument("--quick", action="store_true", help="tiny config (seconds): checks the script runs")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--crop", type=int, default=256)
    ap.add_argument("--default-malloc", action="store_true", help="measure RSS with glibc's adaptive mmap threshold")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="JSON results (--all: default benchmarks/train_memory.json)")
    args = ap.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(args.case, BenchConfig(**json.loads(args.config)))))
        return
    if args.all:
        out = args.out or Path(__file__).with_name("train_memory.json")
        only = tuple(p for p in args.only.split(",") if p)
        runs = json.loads(out.read_text())["runs"] if only and out.exists() else {}
        for label, (cfg, default_malloc) in RECORDED.items():
            if only and not label.startswith(only):
                continue
            cfg.threads = args.threads
            runs[label] = benchmark(cfg, default_malloc, progress=lambda r: print(json.dumps(r), file=sys.stderr))
            print(report(label, runs[label]), flush=True)
        out.write_text(json.dumps({"torch": __import__("torch").__version__, "runs": runs}, indent=2) + "\n")
        return
    cfg = BenchConfig(crop=args.crop, gradient_checkpointing=args.gradient_checkpointing, threads=args.threads)
    if args.quick:
        cfg = BenchConfig(
            hidden_size=64,
            depth=2,
            num_heads=4,
            batch=1,
            crop=64,
            lora_rank=4,
            gradient_checkpointing=args.gradient_checkpointing,
            threads=args.threads,
        )
    res = benchmark(cfg, args.default_malloc)
    print(report("quick" if args.quick else "run", res))
    if args.out:
        args.out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
