"""Judge a GPU burst's model against the campaign's current one, and fold it in if it wins (train/GPU.md).

The rule, written before any burst was evaluated. `teasr eval` at 1 step on the held-out 512x512 crops
(data/photos/val_hr, never trained on), LR made three ways (realesrgan, mild, bicubic; degrade seed 0), the burst's
model and the current one (train/checkpoints/campaign/, else the shipped weights) on the same images. The burst is
adopted only if all three hold:
  1. LPIPS-alex on realesrgan LR is lower than the current model's (issue 18's headline number);
  2. it is better on at least 6 of the 9 perceptual numbers: LPIPS-alex, LPIPS-vgg and DISTS on each LR kind;
  3. PSNR-Y on realesrgan LR is at least min(the current model's, bicubic's - 1 dB) (issue 18's fidelity bar, or
     no worse than now where the current model is already below it).
Adopting replaces config.json and model.safetensors of the campaign folder in place; its train_config.json (the CPU
recipe the campaign continues with) stays, and its metrics.jsonl gains one "gpu-burst" record with the burst's
throughput and both evaluations. The burst's own per-step log goes to train/logs/gpu-burst-DATE/.

    python train/fold_burst.py /work/.device/.../files            # judge only: prints the table and the verdict
    python train/fold_burst.py /work/.device/.../files --adopt    # and fold it in if the rule says so
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CAMPAIGN = ROOT / "train/checkpoints/campaign"
SHIPPED = ROOT / "teasr_cli/weights"
KINDS = ("realesrgan", "mild", "bicubic")
PERCEPTUAL = ("lpips", "lpips-vgg", "dists")  # lower is better


def assemble(files: Path, dst: Path) -> dict:
    """The returned files -> a model folder (parts joined, SHA-256 checked); the burst record."""
    burst = json.loads((files / "burst.json").read_text())
    w = burst["weights"]
    data = b"".join((files / "model" / p).read_bytes() for p in w["parts"])
    if hashlib.sha256(data).hexdigest() != w["sha256"]:
        raise SystemExit(f"fold_burst: the parts of {w['file']} do not add up to the SHA-256 the device wrote")
    dst.mkdir(parents=True, exist_ok=True)
    (dst / w["file"]).write_bytes(data)
    shutil.copy(files / "model" / "config.json", dst / "config.json")
    shutil.copy(files / "model" / "metrics.jsonl", dst / "metrics.jsonl")
    (dst / "train_config.json").write_text(json.dumps(burst["train_config"], indent=2))
    return burst


def evaluate(model: Path, val: Path, work: Path, limit: int | None = None) -> dict:
    """{kind: {metric: mean}} for the model at 1 step, and {kind: {"bicubic_psnr": ...}} from the same run."""
    res = {}
    for kind in KINDS:
        out = work / kind
        cmd = [
            sys.executable,
            "-m",
            "teasr_cli",
            "eval",
            "--hq",
            str(val),
            "--degrade",
            kind,
            "--steps",
            "1",
            "--metrics",
            "psnr,lpips,lpips-vgg,dists",
            "--baseline",
            "bicubic",
            "--model",
            str(model),
            "-o",
            str(out),
            *(["--limit", str(limit)] if limit else []),
        ]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"fold_burst: teasr eval failed on {model}: {(r.stderr or r.stdout).strip()[-300:]}")
        methods = {m["name"]: m for m in json.loads((out / "results.json").read_text())["methods"]}
        model_row = next(m for m in methods.values() if m["steps"] == 1)
        res[kind] = {**model_row["means"], "bicubic_psnr": methods["bicubic"]["means"]["psnr"]}
    return res


def verdict(burst: dict, current: dict) -> tuple[bool, list[str]]:
    """The rule of the module docstring; the reasons, one line each."""
    wins = [(k, m) for k in KINDS for m in PERCEPTUAL if burst[k][m] < current[k][m]]
    headline = burst["realesrgan"]["lpips"] < current["realesrgan"]["lpips"]
    floor = min(current["realesrgan"]["psnr"], current["realesrgan"]["bicubic_psnr"] - 1.0)
    fidelity = burst["realesrgan"]["psnr"] >= floor
    why = [
        f"1. LPIPS-alex on realesrgan LR {burst['realesrgan']['lpips']:.4f} vs {current['realesrgan']['lpips']:.4f}:"
        f" {'lower' if headline else 'not lower'}",
        f"2. better on {len(wins)} of 9 perceptual numbers (needs 6)",
        f"3. PSNR-Y on realesrgan LR {burst['realesrgan']['psnr']:.2f} dB vs floor {floor:.2f} dB: "
        f"{'ok' if fidelity else 'below'}",
    ]
    return headline and len(wins) >= 6 and fidelity, why


def _replace(src: Path, dst: Path):
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copy(src, tmp)
    os.replace(tmp, dst)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", help="the folder the device call's files came back to (burst.json, model/, ...)")
    ap.add_argument("--campaign", default=str(CAMPAIGN))
    ap.add_argument("--val", default=str(ROOT / "data/photos/val_hr"), help="held-out HR crops")
    ap.add_argument("--work", default=None, help="where the assembled model and the evaluations go (default: temp)")
    ap.add_argument("--limit", type=int, default=None, help="only the first N crops (a quick look, not the rule)")
    ap.add_argument("--adopt", action="store_true", help="fold the burst into the campaign if the rule says so")
    args = ap.parse_args(argv)
    files, campaign = Path(args.files), Path(args.campaign)
    if not (files / "burst.json").exists():
        raise SystemExit(f"fold_burst: {files} holds no burst.json (did the burst's training finish?)")
    if not Path(args.val).is_dir():
        raise SystemExit(f"fold_burst: no validation crops at {args.val} (train/prepare_photos.py makes them)")
    work = Path(args.work or tempfile.mkdtemp(prefix="teasr-fold-"))
    model = work / "burst-model"
    burst = assemble(files, model)
    current = campaign if (campaign / "model.safetensors").exists() else SHIPPED
    scores = {
        "burst": evaluate(model, Path(args.val), work / "eval-burst", args.limit),
        "current": evaluate(current, Path(args.val), work / "eval-current", args.limit),
    }
    ok, why = verdict(scores["burst"], scores["current"])
    print(f"{'LR':<11}{'metric':<10}{'burst':>9}{'current':>9}")
    for k in KINDS:
        for m in ("psnr", *PERCEPTUAL):
            print(f"{k:<11}{m:<10}{scores['burst'][k][m]:>9.4f}{scores['current'][k][m]:>9.4f}")
    print("\n".join(why))
    print(f"verdict: {'ADOPT' if ok else 'keep the current model'} (current: {current})")
    record = {
        "time": time.time(),
        "event": "gpu-burst",
        "adopted": ok and args.adopt,
        "verdict": ok,
        "why": why,
        "device": burst["device"],
        "steps": burst["steps"],
        "samples": burst["samples"],
        "samples_s": burst["samples_s_median"],
        "gpu_peak_gib": burst["gpu_peak_gib"],
        "init": burst["init"],
        "sha256": burst["weights"]["sha256"],
        "eval": scores,
    }
    (work / "fold.json").write_text(json.dumps(record, indent=1))
    if args.limit and args.adopt:
        raise SystemExit("fold_burst: --limit is a quick look; the rule needs every crop, so --adopt refuses it")
    if ok and args.adopt:
        if current != campaign:
            raise SystemExit(f"fold_burst: no campaign folder at {campaign} to fold into; the model is in {model}")
        logs = ROOT / "train/logs" / f"gpu-burst-{time.strftime('%Y%m%d-%H%M', time.gmtime())}"
        logs.mkdir(parents=True, exist_ok=True)
        shutil.copy(model / "metrics.jsonl", logs / "metrics.jsonl")
        shutil.copy(model / "train_config.json", logs / "train_config.json")
        (logs / "fold.json").write_text(json.dumps(record, indent=1))
        _replace(model / "model.safetensors", campaign / "model.safetensors")
        _replace(model / "config.json", campaign / "config.json")
        with open(campaign / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"adopted: {campaign} now holds the burst's model; its log is in {logs.relative_to(ROOT)}")
    print(f"details: {work / 'fold.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
