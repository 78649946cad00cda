"""The equal-compute study of issue 18: train each form for the same CPU time, evaluate, plot, rank.

    python train/study.py train hybrid-m tiny --data data/photos/train      # runs/study-<form>/model-{10,20,30}
    python train/study.py eval hybrid-m tiny hybrid-s conv                  # teasr eval of every segment's model
    python train/study.py report --out train/logs/study                    # table, plot, ranking (RULE.md)

A form trains in CPU-time segments (`--max-cpu-minutes`, summed over resumes), each ending with an export that
is kept as model-<minutes>: the learning curve costs no extra training.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
SEGMENTS = (10, 20, 30)  # CPU minutes
LR_KINDS = ("realesrgan", "mild", "bicubic")
METRICS = "psnr,lpips,lpips-vgg,dists"


def teasr(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "teasr_cli", *args], check=True)


def train(forms, data: str, runs: Path) -> None:
    for form in forms:
        run = runs / f"study-{form}"
        for minutes in SEGMENTS:
            if (run / f"model-{minutes}").exists():
                continue
            resume = (
                ["--resume"] if (run / "train_config.json").exists() else ["-c", str(HERE / "study" / f"{form}.toml")]
            )
            teasr("train", "--data", data, "--out", str(run), *resume, "--max-cpu-minutes", str(minutes))
            shutil.copytree(run / "model", run / f"model-{minutes}")


def evaluate(forms, runs: Path, hq: str, kinds=LR_KINDS, curve: bool = True) -> None:
    """1-step scores on each kind of LR, bicubic and Real-ESRGAN beside the first (resumable: a finished eval is
    not run again). The first form must have finished its budget."""
    out = runs / "study-eval"
    for kind in kinds:  # the learning curve on realesrgan LR; the other kinds at the end of the budget
        segments = SEGMENTS if kind == "realesrgan" and curve else SEGMENTS[-1:]
        for i, (form, minutes) in enumerate((f, m) for f in forms for m in reversed(segments)):
            model, dest = runs / f"study-{form}" / f"model-{minutes}", out / f"{form}-{minutes}-{kind}"
            if model.exists() and not (dest / "results.json").exists():
                teasr(
                    "eval",
                    "--hq",
                    hq,
                    "--degrade",
                    kind,
                    "--metrics",
                    METRICS,
                    "--model",
                    str(model),
                    "--steps",
                    "1",
                    "--baseline",
                    "bicubic,realesrgan" if i == 0 else "none",
                    "--out",
                    str(dest),
                )


def means(path: Path, method: str | None = None) -> dict:
    res = json.loads((path / "results.json").read_text())
    return (
        {m["name"]: m["means"] for m in res["methods"]}[method]
        if method
        else {m["name"]: m["means"] for m in res["methods"]}
    )


def report(forms, runs: Path, out: Path) -> dict:
    """study.json (every number), study.png (metric against CPU minutes) and the ranking of RULE.md."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = runs / "study-eval"
    table = {
        kind: {
            "baselines": {
                k: v for k, v in means(ev / f"{forms[0]}-{SEGMENTS[-1]}-{kind}").items() if not k.startswith("teasr")
            },
            **{
                form: {
                    m: means(ev / f"{form}-{m}-{kind}", "teasr 1 step")
                    for m in SEGMENTS
                    if (ev / f"{form}-{m}-{kind}" / "results.json").exists()
                }
                for form in forms
            },
        }
        for kind in LR_KINDS
    }
    keys = [(kind, k) for kind in LR_KINDS for k in ("lpips", "lpips-vgg", "dists")]
    final = {f: {kind: table[kind][f][SEGMENTS[-1]] for kind in LR_KINDS} for f in forms}
    ranks = {f: 0 for f in forms}
    for kind, k in keys:
        for r, f in enumerate(sorted(forms, key=lambda f: final[f][kind][k])):
            ranks[f] += r + 1
    bicubic_psnr = table["realesrgan"]["baselines"]["bicubic"]["psnr"]
    gated = {f: final[f]["realesrgan"]["psnr"] < bicubic_psnr - 1 for f in forms}
    curve = {f: table["realesrgan"][f] for f in forms}  # the tie-break needs the 20-minute point
    slope = {
        f: curve[f][SEGMENTS[-2]]["lpips"] - curve[f][SEGMENTS[-1]]["lpips"] if SEGMENTS[-2] in curve[f] else 0.0
        for f in forms
    }
    order = sorted(forms, key=lambda f: (gated[f], ranks[f], -slope[f]))
    summary = {
        "rule": "train/study/RULE.md",
        "rank_sum": ranks,
        "psnr_gate_failed": gated,
        "lpips_slope_20_30": slope,
        "order": order,
        "table": table,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps(summary, indent=1) + "\n")
    fig, axes = plt.subplots(len(LR_KINDS), 4, figsize=(16, 10), constrained_layout=True)
    for row, kind in zip(axes, LR_KINDS):
        for ax, k in zip(row, ("lpips", "lpips-vgg", "dists", "psnr")):
            for f in forms:
                pts = sorted(table[kind][f].items())
                ax.plot([m for m, _ in pts], [v[k] for _, v in pts], "o-", label=f)
            for name, style in (("bicubic", ":"), ("realesrgan", "--")):
                if name in table[kind]["baselines"]:
                    ax.axhline(table[kind]["baselines"][name][k], ls=style, c="gray", label=name)
            ax.set_title(f"{k} ({kind} LR, 1 step)", fontsize=9)
            ax.set_xlabel("CPU minutes")
    axes[0][0].legend()
    fig.savefig(out / "study.png", dpi=70)
    return summary


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["train", "eval", "report"])
    ap.add_argument("forms", nargs="*")
    ap.add_argument("--data", default="data/photos/train")
    ap.add_argument("--runs", type=Path, default=Path("runs"))
    ap.add_argument("--hq", default="data/photos/val_hr")
    ap.add_argument(
        "--kinds", default=",".join(LR_KINDS), help="with eval: which kinds of LR (to run them in parallel)"
    )
    ap.add_argument("--no-curve", action="store_true", help="with eval: the end of the budget only (a quick ranking)")
    ap.add_argument("--out", type=Path, default=HERE / "logs" / "study")
    args = ap.parse_args()
    forms = args.forms or ["tiny", "hybrid-s", "hybrid-m", "conv"]
    if args.what == "train":
        train(forms, args.data, args.runs)
    elif args.what == "eval":
        evaluate(forms, args.runs, args.hq, args.kinds.split(","), not args.no_curve)
    else:
        summary = report(forms, args.runs, args.out)
        print(json.dumps({k: summary[k] for k in ("rank_sum", "psnr_gate_failed", "order")}))


if __name__ == "__main__":
    main()
