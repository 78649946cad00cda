"""The embedded model's learning curve: 1-step LPIPS on the validation LR against the CPU hours spent on it.

Hours are summed from each run's `metrics.jsonl` (the steps of each logged window over its it_s: compute
time, not wall time, so pauses between sessions do not count) along the chain of runs that each started from the
last one's weights. The points are the `teasr eval` results saved in train/logs/. A straight line in
log(hours) through the recent points says how far this path is from the issue's bar at this rate.

    python train/learning_curve.py            # prints the table, writes logs/learning-curve.{png,json}
"""

from __future__ import annotations

import json
import math
from pathlib import Path

LOGS = Path(__file__).parent / "logs"
# (run, the step the next run started from or the last one evaluated); tiny-sad5's log holds tiny-sad3's 1065 steps
# (one run folder); tiny-sad13 branched off tiny-sad11 like tiny-sad12 and is left out
CHAIN = [
    ("tiny-prior", 6936),
    ("tiny-prior2", 3921),
    ("tiny-sad5", 2517),
    ("tiny-sad8", 2002),
    ("tiny-sad9", 400),
    ("tiny-sad10", 1110),
    ("tiny-sad11", 1592),
    ("tiny-sad12", 1313),
]
# (run, step, eval file stem in logs/: "<stem>-<degradation>.json")
POINTS = [
    ("tiny-prior", 410, "tiny-prior/eval-step410"),
    ("tiny-prior", 6936, "tiny-prior/eval-step6936"),
    ("tiny-prior2", 3200, "tiny-prior2/eval-step3200"),
    ("tiny-sad5", 2517, "eval-sad5"),
    ("tiny-sad8", 2002, "eval-sad8"),
    ("tiny-sad9", 400, "eval-sad9-step400"),
    ("tiny-sad10", 500, "eval-sad10-step500"),
    ("tiny-sad10", 1110, "eval-sad10"),
    ("tiny-sad11", 1592, "eval-sad11-step1592"),
    ("tiny-sad12", 1313, "eval-sad12-step1313"),
]
FIT_FROM = "tiny-sad8"  # the recent rate: tiny-sad5 still carries the jump from the prior to SAD
BAR_FRACTION = 0.75  # issue 5: three quarters of Real-ESRGAN's LPIPS gain over bicubic


def hours_by_step(run: str) -> list[tuple[int, float]]:
    """[(step, compute hours up to it)] of one run."""
    out, total, last = [], 0.0, 0
    for line in (LOGS / run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "it_s" not in r or "event" in r:
            continue
        if r["step"] <= last:  # a resumed run logs the steps after its checkpoint again
            continue
        total += (r["step"] - last) / r["it_s"] / 3600
        last = r["step"]
        out.append((last, total))
    return out


def hours_at(h: list[tuple[int, float]], step: int) -> float:
    return max(hh for s, hh in h if s <= step)


def lpips_means(stem: str, degrade: str) -> dict[str, float] | None:
    """{method name: mean LPIPS} of one saved `teasr eval` result, None if there is none."""
    path = LOGS / f"{stem}-{degrade}.json"
    if not path.is_file():
        return None
    return {m["name"]: m["means"]["lpips"] for m in json.loads(path.read_text())["methods"]}


def curve(degrade: str = "realesrgan") -> list[dict]:
    offset, start, rows = 0.0, {}, []
    for run, last in CHAIN:
        h = hours_by_step(run)
        start[run] = (offset, h)
        offset += hours_at(h, last)
    for run, step, stem in POINTS:
        means = lpips_means(stem, degrade)
        if means is None:
            continue
        base, h = start[run]
        rows.append(
            {
                "run": run,
                "step": step,
                "hours": round(base + hours_at(h, step), 2),
                "lpips": round(means["teasr 1 step"], 4),
            }
        )
    return rows


def log_fit(recent: list[dict]) -> tuple[float, float]:
    """Least squares lpips = a + b log10(hours)."""
    xs, ys = [math.log10(r["hours"]) for r in recent], [r["lpips"] for r in recent]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def main() -> None:
    rows = curve()
    refs = lpips_means("eval-val", "realesrgan")  # bicubic and Real-ESRGAN x4plus on the same LR
    control = lpips_means("eval-regress3", "realesrgan")["teasr 1 step"]
    bicubic, resrgan = refs["bicubic"], refs["realesrgan"]
    bar = bicubic - BAR_FRACTION * (bicubic - resrgan)
    recent = rows[[r["run"] for r in rows].index(FIT_FROM) :]
    a, b = log_fit(recent)
    reach = 10 ** ((bar - a) / b) if b < 0 else math.inf
    print(f"{'run':<12} {'step':>5} {'CPU h':>6} {'LPIPS':>6}")
    for r in rows:
        print(f"{r['run']:<12} {r['step']:>5} {r['hours']:>6.2f} {r['lpips']:>6.4f}")
    print(f"bicubic {bicubic:.3f}, control (15 min) {control:.3f}, bar {bar:.3f}, Real-ESRGAN x4plus {resrgan:.3f}")
    print(f"from {FIT_FROM} on: LPIPS = {a:.3f} {b:+.3f} log10(hours); the bar at ~{reach:,.0f} CPU hours on this path")
    (LOGS / "learning-curve.json").write_text(
        json.dumps(
            {
                "rows": rows,
                "bicubic": bicubic,
                "control": control,
                "bar": bar,
                "realesrgan": resrgan,
                "fit": {"a": a, "b": b, "bar_hours": reach},
            },
            indent=1,
        )
    )

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot([r["hours"] for r in rows], [r["lpips"] for r in rows], "o-", label="teasr-tiny, 1 step")
    for i, r in enumerate(rows):  # labels alternately above and below: the late points lie close together
        ax.annotate(
            f"{r['run'].removeprefix('tiny-')}@{r['step']}",
            (r["hours"], r["lpips"]),
            fontsize=6,
            rotation=45 if i % 2 else -45,
            textcoords="offset points",
            xytext=(2, 5 if i % 2 else -5),
            va="bottom" if i % 2 else "top",
        )
    hs = [recent[0]["hours"], min(reach, 1e4)]
    ax.plot(hs, [a + b * math.log10(h) for h in hs], ":", color="gray", label=f"log fit from {FIT_FROM}")
    for y, name, style in (
        (bicubic, "bicubic", "--"),
        (control, "regression control (0.25 h)", "-."),
        (bar, "issue 5 bar", "-"),
        (resrgan, "Real-ESRGAN x4plus", "--"),
    ):
        ax.axhline(y, ls=style, lw=1, color="k" if name == "issue 5 bar" else "gray")
        ax.text(rows[0]["hours"], y + 0.005, name, fontsize=7)
    ax.set_xscale("log")
    ax.set_ylim(0.18, 0.74)
    ax.set_xlabel("CPU hours of training (2 cores), cumulative along the chain of runs")
    ax.set_ylabel("LPIPS-alex, realesrgan LR, 8 val crops")
    ax.set_title("teasr-tiny: 1-step LPIPS against training time", fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(LOGS / "learning-curve.png", dpi=120)


if __name__ == "__main__":
    main()
