"""The campaign's learning curve: 1-step scores on realesrgan LR against CPU minutes since the study began.

    python train/campaign_curve.py          # train/logs/campaign/eval-m<minutes>-<kind>.json -> campaign.{json,png}

Points: the study's 30-minute hybrid-m and conv-only control (train/logs/study/study.json), then every campaign
evaluation `eval-m<CPU minutes>-realesrgan.json`. Lines: bicubic, Real-ESRGAN x4plus, the shipped teasr-tiny
(`eval-default-realesrgan.json`) and the issue-18 bar (3/4 of Real-ESRGAN's LPIPS gain over bicubic).
"""

import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

LOGS = Path(__file__).parent / "logs"
KEYS = ("lpips", "lpips-vgg", "dists", "psnr")


def means(path: Path) -> dict:
    return {m["name"]: m["means"] for m in json.loads(path.read_text())["methods"]}


def main():
    study = json.loads((LOGS / "study" / "study.json").read_text())["table"]["realesrgan"]
    camp = LOGS / "campaign"
    points = {30: study["hybrid-m"]["30"]}
    for p in camp.glob("eval-m*-realesrgan.json"):
        points[int(re.match(r"eval-m(\d+)-", p.name).group(1))] = means(p)["teasr 1 step"]
    base = means(camp / "eval-default-realesrgan.json")
    lines = {"bicubic": base["bicubic"], "Real-ESRGAN x4plus": base["realesrgan"], "teasr-tiny": base["teasr 1 step"]}
    bar = lines["bicubic"]["lpips"] - 0.75 * (lines["bicubic"]["lpips"] - lines["Real-ESRGAN x4plus"]["lpips"])
    minutes, conv = sorted(points), study["conv"]["30"]
    curve = {"cpu_minutes": minutes, "hybrid-m": [points[m] for m in minutes], "lines": lines}
    curve["conv control (30 min)"], curve["lpips_bar"] = conv, bar
    (camp / "campaign.json").write_text(json.dumps(curve, indent=1) + "\n")
    fig, axes = plt.subplots(1, len(KEYS), figsize=(16, 3.6), constrained_layout=True)
    for ax, k in zip(axes, KEYS):
        ax.plot(minutes, [p[k] for p in curve["hybrid-m"]], "o-", label="campaign (hybrid-m)")
        ax.plot([30], [conv[k]], "s", c="tab:red", label="conv control, 30 min")
        for (name, v), style in zip(lines.items(), (":", "--", "-.")):
            ax.axhline(v[k], ls=style, c="gray", label=name)
        if k == "lpips":
            ax.axhline(bar, c="tab:green", lw=0.8, label="issue-18 bar")
        ax.set_title(f"{k} (realesrgan LR, 1 step)", fontsize=9)
        ax.set_xlabel("CPU minutes (study + campaign)")
    axes[0].legend(fontsize=7)
    fig.savefig(camp / "campaign.png", dpi=70)
    print(json.dumps({m: round(p["lpips"], 4) for m, p in points.items()}))


if __name__ == "__main__":
    main()
