"""CPU cost of one training step by network form and stage, measured side by side in one run: where the lead of
issue 18's equal-time conv control over the campaign comes from, the form or the objective.

    python benchmarks/train_step_cost.py [--steps 8] [--data data/photos/train]

Each case is a real run of `teasr train`'s loop on the training photos with the campaign's settings (batch 6 of
192-px crops, LPIPS-alex, 2 threads): the control in its recipe (`train/recipes/control-conv.toml`), hybrid-m in
that recipe, and hybrid-m in the campaign's last SAD recipe (`campaign-cpu-sad-lpips.toml`; stage sad needs DiT
blocks, which the control lacks). The figure is process CPU seconds per step from the end of step 2 to the end of
the last (the first steps load LPIPS and fill the photo cache). Weights do not change the cost; SAD starts from
teasr-hybrid. Records train_step_cost.json beside this file.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "train/recipes"


def step_cost(recipe: str, out: Path, data: str, steps: int, **overrides) -> float:
    """CPU seconds per step of a `steps`-step run of `recipe`, from its metrics.jsonl."""
    from teasr_cli.trainer import TrainConfig, train

    cfg = TrainConfig.load(str(RECIPES / recipe), data=data, out=str(out), steps=steps, log_every=1,
                           ckpt_every=10**6, **overrides)  # fmt: skip
    train(cfg)
    cpu = {r["step"]: r["cpu_s"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
           if "cpu_s" in r and "step" in r and "event" not in r}  # fmt: skip
    return (cpu[steps] - cpu[2]) / (steps - 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--data", default=str(ROOT / "data/photos/train"))
    a = p.parse_args()
    hybrid = json.loads((ROOT / "teasr_cli/weights/config.json").read_text())["model"]
    hybrid = {k: v for k, v in hybrid.items() if not k.startswith("cond_lora")}  # a new model: the LoRA is SAD's
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        cost = {
            "control, regress": step_cost("control-conv.toml", t / "c", a.data, a.steps),
            "hybrid-m, regress": step_cost("control-conv.toml", t / "h", a.data, a.steps, model=hybrid),
            "hybrid-m, sad": step_cost("campaign-cpu-sad-lpips.toml", t / "s", a.data, a.steps,
                                       init=str(ROOT / "teasr_cli/weights")),
        }  # fmt: skip
    rows = {k: {"cpu_s_per_step": round(c, 2), "x_control_regress": round(c / cost["control, regress"], 2)}
            for k, c in cost.items()}  # fmt: skip
    rec = {"machine": platform.processor() or platform.machine(), "steps": a.steps, "cases": rows}
    rec["form: hybrid-m over control, regress"] = rows["hybrid-m, regress"]["x_control_regress"]
    rec["objective: sad over regress, hybrid-m"] = round(cost["hybrid-m, sad"] / cost["hybrid-m, regress"], 2)
    Path(__file__).with_suffix(".json").write_text(json.dumps(rec, indent=1) + "\n")
    for k, r in rows.items():
        print(f"{k:<20}{r['cpu_s_per_step']:>7.2f} CPU-s/step {r['x_control_regress']:>6.2f}x the control's")


if __name__ == "__main__":
    main()
