"""The issue-18 campaign's bookkeeping: evaluate a model the way logs/campaign/RULE.md says, judge it line by line,
fold a finished run into the one resumable folder, and plot the learning curve.

    python train/campaign.py eval teasr_cli/weights --name default  # the shipped model, + bicubic, Real-ESRGAN
    python train/campaign.py eval runs/campaign-sad2/model --name m410  # logs/campaign/eval-m410-<kind>, seam-m410
    python train/campaign.py judge m410       # RULE.md against eval-default-*, line by line -> judge-m410.json
    python train/campaign.py fold runs/campaign-sad2     # its fp16 export replaces checkpoints/campaign in place
    python train/campaign.py fold runs/control-s14 --control   # the conv control's: checkpoints/campaign/control
    python train/campaign.py curve            # eval-m<minutes>-realesrgan.json -> campaign.json, campaign.png
    python train/campaign.py eval teasr_cli/weights --name sampler-nocf --color-fix none  # a sampler default
    python train/campaign.py judge sampler-nocf   # addendum 7 against eval-default-*

`eval` names are `m<CPU minutes since the study began>` (the curve's x axis), `default`, `control-m<N>` (the conv
control, addendum 2) or `sampler-<what>` (the default weights with another sampler setting, addendum 7).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOGS = ROOT / "train/logs/campaign"
FOLDER = ROOT / "train/checkpoints/campaign"
CONTROL = FOLDER / "control"  # the conv control's fp16 EMA and log, carried from session to session (addendum 9)
SPEED = ROOT / "benchmarks/upscale_vs_realesrgan_campaign.json"
KINDS = ("realesrgan", "mild", "bicubic")
KEYS = ("lpips", "lpips-vgg", "dists", "psnr")
CONTROL_MINUTES = 1063  # the CPU-minutes the default's weights carry: the control's equal time (RULE.md addenda 8, 10)


def teasr(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "teasr_cli", *args], cwd=ROOT, check=True)


def means(name: str, kind: str) -> dict:
    res = json.loads((LOGS / f"eval-{name}-{kind}.json").read_text())
    return {m["name"]: m["means"] for m in res["methods"]}


def evaluate(model: str, name: str, hq: str = "data/photos/val_hr", color_fix: str = "wavelet") -> None:
    """RULE.md's evaluations: 1, 2 and 4 steps on realesrgan LR (+ NIQE), 1 step on mild and bicubic LR; the
    shipped model's runs also score bicubic (and Real-ESRGAN and the HR photos' own NIQE on realesrgan LR). Then
    the token-grid check.
    The conv control (`control-m<N>`, addendum 2) is a regression model: 1 step only. `color_fix` is the
    sampler's (addendum 7); the token-grid check runs the default sampler, whose grid it measures."""
    sys.path.insert(0, str(ROOT / "train"))
    from seam_check import seam_check

    for kind in KINDS:
        first = kind == "realesrgan"
        base = ("bicubic,realesrgan,hr" if first else "bicubic") if name == "default" else "none"
        metrics = "psnr,lpips,lpips-vgg,dists" + ",niqe" * first
        out = ROOT / "eval_results" / f"{name}-{kind}"
        steps = "1,2,4" if first and not name.startswith("control-") else "1"
        teasr("eval", "--model", model, "--hq", hq, "--degrade", kind, "--steps", steps,
              "--metrics", metrics, "--baseline", base, "--color-fix", color_fix, "--out", str(out))  # fmt: skip
        shutil.copy(out / "results.json", LOGS / f"eval-{name}-{kind}.json")
    side, ratios = seam_check(model)
    side.save(ROOT / "eval_results" / f"{name}-seam.png")
    rec = {"model": model, "sha256": weights_sha(Path(model)), "grid_ratio": ratios}
    (LOGS / f"seam-{name}.json").write_text(json.dumps(rec, indent=1) + "\n")


def weights_sha(folder: Path) -> str:
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def rule(c: dict, d: dict, token_grid: float, mb: float, speed: float | None) -> dict:
    """RULE.md's lines {line: (pass, numbers)}: candidate `c` and default `d` as {kind: {method: means}}."""
    one = {k: (c[k]["teasr 1 step"]["lpips"], d[k]["teasr 1 step"]["lpips"]) for k in KINDS}
    rc, rd = c["realesrgan"]["teasr 1 step"], d["realesrgan"]["teasr 1 step"]
    bicubic_psnr = d["realesrgan"]["bicubic"]["psnr"]
    four = c["realesrgan"]["teasr 4 steps"]["lpips"], d["realesrgan"]["teasr 4 steps"]["lpips"]
    return {
        "1 LPIPS no worse on each LR, 0.005 better on one": (
            all(a <= b for a, b in one.values()) and any(b - a >= 0.005 for a, b in one.values()),
            {k: f"{a:.4f} vs {b:.4f}" for k, (a, b) in one.items()},
        ),
        "2 LPIPS-vgg and DISTS no worse": (
            rc["lpips-vgg"] <= rd["lpips-vgg"] and rc["dists"] <= rd["dists"],
            f"{rc['lpips-vgg']:.4f} vs {rd['lpips-vgg']:.4f}, {rc['dists']:.4f} vs {rd['dists']:.4f}",
        ),
        "3 PSNR-Y within 1 dB of bicubic": (rc["psnr"] >= bicubic_psnr - 1, f"{rc['psnr']:.2f} vs {bicubic_psnr:.2f}"),
        "4 4-step LPIPS within 0.01": (four[0] <= four[1] + 0.01, f"{four[0]:.4f} vs {four[1]:.4f}"),
        "5 token grid: 16/4-px border ratio <= 1.01 (addendum 1)": (token_grid <= 1.01, f"{token_grid:.3f}"),
        "6 <= 20 MB and >= 3x Real-ESRGAN's speed": (
            mb <= 20 and speed is not None and speed >= 3,
            f"{mb:.1f} MB, " + ("speed not measured" if speed is None else f"{speed:.2f}x"),
        ),
    }


def bars(c: dict, d: dict) -> dict:
    """Issue 18's bars that one model's scores show (RULE.md addendum 5: reported, not a ship line) {bar: (pass,
    numbers)}: candidate `c` as in `rule`, bicubic and Real-ESRGAN from the default's evaluation `d`."""
    r, base = c["realesrgan"], d["realesrgan"]
    bic, esr, one = base["bicubic"]["lpips"], base["realesrgan"]["lpips"], r["teasr 1 step"]
    gain = (bic - one["lpips"]) / (bic - esr)
    steps = {n: r[f"teasr {n} steps"] for n in (2, 4)}
    clean = c["bicubic"]["teasr 1 step"]["lpips"], d["bicubic"]["bicubic"]["lpips"]
    return {
        "3/4 of Real-ESRGAN's LPIPS gain over bicubic": (gain >= 0.75, f"{gain:.1%}"),
        "2 and 4 steps: NIQE below 1 step's, LPIPS within 0.05": (
            all(s["niqe"] < one["niqe"] and s["lpips"] <= one["lpips"] + 0.05 for s in steps.values()),
            f"NIQE {one['niqe']:.2f} / {steps[2]['niqe']:.2f} / {steps[4]['niqe']:.2f}, LPIPS {one['lpips']:.4f}"
            f" / {steps[2]['lpips']:.4f} / {steps[4]['lpips']:.4f} at 1 / 2 / 4 steps"
            f"; the HR photos' own NIQE {base['hr']['niqe']:.2f} (addendum 6)",
        ),
        "clean LR: LPIPS below bicubic's": (clean[0] < clean[1], f"{clean[0]:.4f} vs {clean[1]:.4f}"),
        "stretch: LPIPS below Real-ESRGAN's": (one["lpips"] < esr, f"{one['lpips']:.4f} vs {esr:.4f}"),
    }


def level(c: dict, h: dict) -> dict:
    """Addendum 2's lines {line: (pass, numbers)}: teasr-hybrid `h` against the conv control `c`, each as
    {method: means} on realesrgan LR."""
    one, ctrl, keys = h["teasr 1 step"], c["teasr 1 step"], ("lpips", "lpips-vgg", "dists")
    niqe = {n: h[f"teasr {n} steps"]["niqe"] for n in (2, 4)}
    return {
        "level at 1 step: LPIPS-alex, LPIPS-vgg and DISTS no worse": (
            all(one[k] <= ctrl[k] for k in keys),
            {k: f"{one[k]:.4f} vs {ctrl[k]:.4f}" for k in keys},
        ),
        "more realistic: NIQE at 2 and 4 steps below the control's": (
            all(v < ctrl["niqe"] for v in niqe.values()),
            {f"{n} steps": f"{v:.2f} vs {ctrl['niqe']:.2f}" for n, v in niqe.items()},
        ),
    }


def sampler_rule(c: dict, d: dict) -> dict:
    """Addendum 7's lines {line: (pass, numbers)}: the default weights with another sampler setting `c` against
    the default sampler `d`, each as in `rule`."""
    one = {k: (c[k]["teasr 1 step"], d[k]["teasr 1 step"]) for k in KINDS}
    rc, rd = one["realesrgan"]
    steps = {n: (c["realesrgan"][f"teasr {n} steps"], d["realesrgan"][f"teasr {n} steps"]) for n in (2, 4)}
    return {
        "1 LPIPS no worse on each LR": (
            all(a["lpips"] <= b["lpips"] for a, b in one.values()),
            {k: f"{a['lpips']:.4f} vs {b['lpips']:.4f}" for k, (a, b) in one.items()},
        ),
        "2 LPIPS-vgg and DISTS no worse": (
            rc["lpips-vgg"] <= rd["lpips-vgg"] and rc["dists"] <= rd["dists"],
            f"{rc['lpips-vgg']:.4f} vs {rd['lpips-vgg']:.4f}, {rc['dists']:.4f} vs {rd['dists']:.4f}",
        ),
        "3 PSNR-Y at most 0.05 dB lower on each LR": (
            all(a["psnr"] >= b["psnr"] - 0.05 for a, b in one.values()),
            {k: f"{a['psnr']:.3f} vs {b['psnr']:.3f}" for k, (a, b) in one.items()},
        ),
        "4 2 and 4 steps: LPIPS and NIQE no worse": (
            all(a[k] <= b[k] for a, b in steps.values() for k in ("lpips", "niqe")),
            {
                f"{n} steps": f"{a['lpips']:.4f} vs {b['lpips']:.4f}, NIQE {a['niqe']:.3f} vs {b['niqe']:.3f}"
                for n, (a, b) in steps.items()
            },
        ),
    }


def model_lines(folder: Path, seam: dict, scores: list[dict]) -> dict:
    """RULE.md's six lines for a model folder, with its size, the recorded speed and the seam check."""
    mb = sum(f.stat().st_size for f in folder.iterdir() if f.is_file()) / 1e6
    # Speed depends on the network, not its weights: the recorded ratio holds for a folder of the same network.
    bench, net = json.loads(SPEED.read_text()), json.loads((folder / "config.json").read_text())["model"]
    timed = [m for m, n in bench.get("networks", {}).items() if n == net]
    speed = bench["realesrgan_over_teasr"][timed[0]] if timed else None
    return rule(*scores, seam["grid_ratio"]["model"]["16/4"], mb, speed)


def judge(name: str) -> dict:
    """Every line of RULE.md for the model evaluated as `name`, against `default` scored the same way; for the
    conv control (`control-m<N>`), addendum 2's bar that the default must hold against it; for a sampler setting
    (`sampler-<what>`), addendum 7's lines."""
    seam = json.loads((LOGS / f"seam-{name}.json").read_text())
    folder = Path(json.loads((LOGS / f"eval-{name}-realesrgan.json").read_text())["config"]["model_folder"])
    if seam.get("sha256") != weights_sha(folder):  # the folder was replaced (a fold) since `eval`
        raise SystemExit(f"{folder}: not the weights evaluated as {name}; run `campaign.py eval` again")
    control = name.startswith("control-")
    if control:
        found = {"lines": level(means(name, "realesrgan"), means("default", "realesrgan"))}
    else:  # the control is scored on realesrgan LR only, so only the others have every kind of LR
        sampler = name.startswith("sampler-")  # addendum 7; its line 5 is a look at the crops, not a number
        if not sampler and "16/4" not in seam["grid_ratio"]["model"]:
            raise SystemExit(f"{name} was evaluated before RULE.md's addendum 1; run `campaign.py eval` again")
        scores = [{k: means(n, k) for k in KINDS} for n in (name, "default")]
        lines = sampler_rule(*scores) if sampler else model_lines(folder, seam, scores)
        found = {"lines": lines, "issue_bars": bars(*scores)}
    verdict = {"model": str(folder.relative_to(ROOT)), "sha256": seam["sha256"]}
    if control:  # addenda 2-4: the bar is judged at the default's CPU-minutes; earlier exports are curve points
        verdict["verdict"] = "interim" if int(name.split("-m")[1]) < CONTROL_MINUTES else "final"
    verdict["holds" if control else "ships"] = all(ok for ok, _ in found["lines"].values())
    verdict |= {part: {k: {"pass": ok, "numbers": v} for k, (ok, v) in got.items()} for part, got in found.items()}
    (LOGS / f"judge-{name}.json").write_text(json.dumps(verdict, indent=1) + "\n")
    return verdict


def chain(metrics: list[dict]) -> list[dict]:
    """The runs of a joined metrics.jsonl: stage, photos, the weights each started from (a branch names its own),
    and the step and CPU minutes of each run's last record."""
    runs = []
    for r in metrics:
        if "config" in r:
            c = r["config"]
            runs.append(
                {"run": c["out"], "stage": c["stage"], "images": r["images"], "steps": 0, "init": c.get("init")}
            )
        elif "cpu_s" in r and runs:
            runs[-1]["cpu_min"] = round(r["cpu_s"] / 60)
            runs[-1]["steps"] = r["step"]
    return runs


def card_section(runs: list[dict]) -> str:
    """The model card's campaign section: the chain of runs (`chain` of the joined metrics.jsonl)."""
    total = 0
    rows = []
    for r in runs:
        total += r.get("cpu_min", 0)
        cells = (r["run"], r["stage"], r["steps"], r.get("cpu_min", "?"), total, r["images"], r["init"] or "-")
        rows.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join([
        "## The campaign so far (issue 18)\n",
        f"One model in a chain of `teasr train` runs, {total} CPU-minutes on 2 cores in all. `metrics.jsonl`",
        "holds every run's log in order; `train/README.md` has the commands, `train/logs/campaign/` the evaluations",
        "and the verdicts of `RULE.md`. \"from\" is the weights a run started from: the folder, or a branch.\n",
        "| run | stage | steps | CPU min | cumulative | photos | from |",
        "|---|---|---:|---:|---:|---:|---|",
        *rows,
        "\n## Training recipe (the last run)",
    ])  # fmt: skip


def fold(run: Path, folder: Path = FOLDER) -> int:
    """Replace the campaign folder (or the control's, which it holds) in place: the run's fp16 EMA export, its
    train_config.json, the joined metrics.jsonl, and a model card whose campaign section is the chain of runs read
    from those metrics. Returns the CPU-minutes of the chain's runs: what the control's weights carry, since its
    chain has no branches; the campaign's chain also holds the branches that were not kept."""
    new, old = folder.with_name(folder.name + ".new"), folder.with_name(folder.name + ".old")
    shutil.rmtree(new, ignore_errors=True)
    teasr("export", str(run), "-o", str(new), "--half")
    shutil.copy(run / "train_config.json", new)
    earlier = (folder / "metrics.jsonl").read_text() if folder.exists() else ""  # a chain's first fold
    joined = earlier + (run / "metrics.jsonl").read_text()
    (new / "metrics.jsonl").write_text(joined)
    runs = chain([json.loads(line) for line in joined.splitlines()])
    card = (new / "README.md").read_text().replace(f"# {new.name}", f"# {folder.name}", 1)
    (new / "README.md").write_text(card.replace("## Training recipe", card_section(runs), 1))
    if (folder / CONTROL.name).is_dir():  # the control's chain rides in the campaign folder (addendum 9)
        (folder / CONTROL.name).rename(new / CONTROL.name)
    if folder.exists():
        folder.rename(old)
    new.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
    return sum(r.get("cpu_min", 0) for r in runs)


def curve() -> dict:
    """1-step scores on realesrgan LR against CPU minutes: the study's 30-minute hybrid-m, then every eval-m<N>;
    beside it the equal-time conv control, every eval-control-m<N> (addendum 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    study = json.loads((LOGS.parent / "study" / "study.json").read_text())["table"]["realesrgan"]
    points, control = {30: study["hybrid-m"]["30"]}, {}
    for p in LOGS.glob("eval-*-realesrgan.json"):
        if name := re.fullmatch(r"eval-((control-)?m(\d+))-realesrgan\.json", p.name):  # not default, sampler-*
            points_of = control if name.group(2) else points
            points_of[int(name.group(3))] = means(name.group(1), "realesrgan")["teasr 1 step"]
    base, tiny = means("default", "realesrgan"), means("teasr-tiny", "realesrgan")  # tiny: the default until m656
    lines = {"bicubic": base["bicubic"], "Real-ESRGAN x4plus": base["realesrgan"], "teasr-tiny": tiny["teasr 1 step"]}
    bar = lines["bicubic"]["lpips"] - 0.75 * (lines["bicubic"]["lpips"] - lines["Real-ESRGAN x4plus"]["lpips"])
    minutes, conv = sorted(points), study["conv"]["30"]
    data = {"cpu_minutes": minutes, "hybrid-m": [points[m] for m in minutes], "lines": lines}
    data["conv control (30 min)"], data["lpips_bar"] = conv, bar
    data["conv control"] = control = dict(sorted(control.items()))
    (LOGS / "campaign.json").write_text(json.dumps(data, indent=1) + "\n")
    fig, axes = plt.subplots(1, len(KEYS), figsize=(16, 3.6), constrained_layout=True)
    for ax, k in zip(axes, KEYS):
        ax.plot(minutes, [p[k] for p in data["hybrid-m"]], "o-", label="campaign (hybrid-m)")
        ax.plot(list(control), [p[k] for p in control.values()], "s-", c="tab:red", label="conv control")
        ax.plot([30], [conv[k]], "s", mfc="none", c="tab:red", label="conv control, study (1 thread)")
        for (name, v), style in zip(lines.items(), (":", "--", "-.")):
            ax.axhline(v[k], ls=style, c="gray", label=name)
        if k == "lpips":
            ax.axhline(bar, c="tab:green", lw=0.8, label="issue-18 bar")
        ax.set_title(f"{k} (realesrgan LR, 1 step)", fontsize=9)
        ax.set_xlabel("CPU minutes (study + campaign)")
    axes[0].legend(fontsize=7)
    fig.savefig(LOGS / "campaign.png", dpi=70)
    return {"hybrid-m": {m: round(p["lpips"], 4) for m, p in points.items()},
            "conv control": {m: round(p["lpips"], 4) for m, p in control.items()}}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("eval", help="RULE.md's evaluations of a model folder")
    e.add_argument("model")
    e.add_argument("--name", required=True, help="m<CPU minutes>, default, control-m<N> or sampler-<what>")
    e.add_argument("--color-fix", default="wavelet", help="the sampler's colour fix (addendum 7)")
    sub.add_parser("judge", help="RULE.md line by line").add_argument("name")
    f = sub.add_parser("fold", help="a finished run replaces the campaign folder")
    f.add_argument("run", type=Path)
    f.add_argument("--control", action="store_true", help="the conv control's run (addendum 9)")
    sub.add_parser("curve", help="campaign.png and campaign.json")
    a = p.parse_args()
    if a.cmd == "eval":
        evaluate(a.model, a.name, color_fix=a.color_fix)
    elif a.cmd == "judge":
        v = judge(a.name)
        for line, r in v["lines"].items():
            print(f"{'pass' if r['pass'] else 'FAIL'}  {line}: {r['numbers']}")
        for bar, r in v.get("issue_bars", {}).items():
            print(f"{'met' if r['pass'] else 'not met'}  (issue bar, not a line) {bar}: {r['numbers']}")
        if "holds" in v:
            print(f"teasr-hybrid against {v['model']} ({v['verdict']}): {'level' if v['holds'] else 'not level'}")
        elif a.name.startswith("sampler-"):
            print(f"{a.name}: " + ("lines 1-4 hold; line 5 is a look at the crops" if v["ships"] else "stays off"))
        else:
            print(f"{v['model']}: {'ships' if v['ships'] else 'does not ship; the campaign goes on'}")
    elif a.cmd == "fold":
        folder = CONTROL if a.control else FOLDER
        print(f"{folder.relative_to(ROOT)}: {fold(a.run, folder)} CPU-minutes in its chain of runs")
    else:
        print(json.dumps(curve()))


if __name__ == "__main__":
    main()
