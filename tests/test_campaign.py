"""train/campaign.py: the ship rule of train/logs/campaign/RULE.md line by line, and folding a run into the one
resumable campaign folder (a real tiny training run, exported and swapped in place)."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from safetensors import safe_open
from skimage import data as skdata

from teasr_cli.folders import load_pretrained
from teasr_cli.trainer import TrainConfig, train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
import campaign  # noqa: E402


def scores(lpips=(0.38, 0.29, 0.17), vgg=0.49, dists=0.28, psnr=28.0, four=0.47):
    """{kind: {method: means}} as campaign.means reads them from `teasr eval`'s results.json."""
    out = {k: {"teasr 1 step": {"lpips": v}} for k, v in zip(campaign.KINDS, lpips)}
    out["realesrgan"]["teasr 1 step"].update({"lpips-vgg": vgg, "dists": dists, "psnr": psnr})
    out["realesrgan"]["teasr 4 steps"] = {"lpips": four}
    out["realesrgan"]["bicubic"] = {"psnr": 28.6}
    return out


def ships(c, grid=0.99, mb=18.0, speed=6.9):
    lines = campaign.rule(c, scores(lpips=(0.385, 0.298, 0.180), vgg=0.50, dists=0.281, four=0.473), grid, mb, speed)
    return [name[0] for name, (ok, _) in lines.items() if not ok]


def test_rule_passes_a_model_that_meets_every_line():
    assert ships(scores()) == []


@pytest.mark.parametrize(
    "cand, kw, failed",
    [
        (scores(lpips=(0.38, 0.30, 0.17)), {}, ["1"]),  # worse on mild LR
        (scores(lpips=(0.383, 0.296, 0.178)), {}, ["1"]),  # no worse anywhere, but nowhere 0.005 better
        (scores(vgg=0.51), {}, ["2"]),
        (scores(dists=0.29), {}, ["2"]),
        (scores(psnr=27.5), {}, ["3"]),  # 1.1 dB under bicubic
        (scores(four=0.49), {}, ["4"]),
        (scores(), {"grid": 1.02}, ["5"]),
        (scores(), {"mb": 21.0}, ["6"]),
        (scores(), {"speed": 2.9}, ["6"]),
        (scores(), {"speed": None}, ["6"]),  # never measured: not shipped on trust
    ],
)
def test_rule_fails_exactly_the_line_that_does_not_hold(cand, kw, failed):
    assert ships(cand, **kw) == failed


def test_rule_holds_at_its_bounds():
    assert ships(scores(lpips=(0.38, 0.298, 0.180), psnr=27.6, four=0.483), grid=1.01, mb=20.0, speed=3.0) == []


def with_steps(c, niqe=(6.3, 6.1, 6.0), lpips=(0.299, 0.33, 0.348), clean=0.15):
    """`scores` with what issue 18's bars read: NIQE and LPIPS at 1, 2 and 4 steps, and clean LR."""
    r = c["realesrgan"]
    for n, q, lp in zip((1, 2, 4), niqe, lpips):
        r.setdefault(f"teasr {n} step" + "s" * (n > 1), {}).update(niqe=q, lpips=lp)
    c["bicubic"]["teasr 1 step"]["lpips"] = clean
    return c


DEFAULT = {
    "realesrgan": {"bicubic": {"lpips": 0.6}, "realesrgan": {"lpips": 0.2}, "hr": {"niqe": 6.41}},
    "bicubic": {"bicubic": {"lpips": 0.2}},
}


@pytest.mark.parametrize(
    "cand, failed",
    [
        (with_steps(scores()), ["stretch"]),  # 75.3% of the gain; 2 and 4 steps within 0.05 and more natural
        (with_steps(scores(), lpips=(0.301, 0.33, 0.33)), ["3/4", "stretch"]),  # 74.8%
        (with_steps(scores(), niqe=(6.3, 6.3, 6.0)), ["2", "stretch"]),  # 2 steps only level: not more natural
        (with_steps(scores(), lpips=(0.299, 0.350, 0.33)), ["2", "stretch"]),  # 2 steps 0.051 above
        (with_steps(scores(), clean=0.2), ["clean", "stretch"]),
        (with_steps(scores(), lpips=(0.19, 0.2, 0.2)), []),
    ],
)
def test_issue_bars_fail_exactly_the_bar_not_met(cand, failed):
    found = campaign.bars(cand, DEFAULT)
    assert [bar.split()[0].rstrip(":") for bar, (ok, _) in found.items() if not ok] == failed
    assert found["2 and 4 steps: NIQE below 1 step's, LPIPS within 0.05"][1].endswith("own NIQE 6.41 (addendum 6)")


def realesrgan(lpips=0.33, vgg=0.47, dists=0.25, niqe=(6.5, 6.0, 5.9)):
    """{method: means} on realesrgan LR: 1, 2 and 4 steps (a control has its 1 step only)."""
    out = {"teasr 1 step": {"lpips": lpips, "lpips-vgg": vgg, "dists": dists, "niqe": niqe[0]}}
    out.update({f"teasr {n} steps": {"niqe": v} for n, v in zip((2, 4), niqe[1:])})
    return out


@pytest.mark.parametrize(
    "control, failed",
    [
        (realesrgan(), []),  # equal everywhere is level; NIQE 6.0 and 5.9 are below the control's 6.5
        (realesrgan(lpips=0.329), ["level"]),
        (realesrgan(vgg=0.469), ["level"]),
        (realesrgan(dists=0.249), ["level"]),
        (realesrgan(niqe=(5.95, 0, 0)), ["more"]),  # 4 steps (5.9) beat it, 2 steps (6.0) do not
        (realesrgan(lpips=0.3, niqe=(5.0, 0, 0)), ["level", "more"]),
    ],
)
def test_level_with_the_control_fails_exactly_the_bar_that_does_not_hold(control, failed):
    lines = campaign.level(control, realesrgan())
    assert [name.split()[0] for name, (ok, _) in lines.items() if not ok] == failed


def sampler(lpips=(0.30, 0.27, 0.17), vgg=0.46, dists=0.24, psnr=(28.9, 29.5, 31.0), four=(0.33, 6.3), two=(0.32, 6.6)):
    """{kind: {method: means}} with what addendum 7 reads: 1 step on each LR, 2 and 4 steps on realesrgan LR."""
    out = {k: {"teasr 1 step": {"lpips": lp, "psnr": q}} for k, lp, q in zip(campaign.KINDS, lpips, psnr)}
    out["realesrgan"]["teasr 1 step"].update({"lpips-vgg": vgg, "dists": dists})
    out["realesrgan"] |= {f"teasr {n} steps": {"lpips": lp, "niqe": q} for n, (lp, q) in ((2, two), (4, four))}
    return out


@pytest.mark.parametrize(
    "cand, failed",
    [
        (sampler(), []),  # the same everywhere: loses nowhere
        (sampler(lpips=(0.299, 0.271, 0.169)), ["1"]),  # better on two LR kinds, worse on mild
        (sampler(vgg=0.4601), ["2"]),
        (sampler(dists=0.2401), ["2"]),
        (sampler(psnr=(28.85, 29.5, 31.0)), []),  # 0.05 dB lower: the bound
        (sampler(psnr=(28.9, 29.5, 30.94)), ["3"]),
        (sampler(two=(0.3201, 6.5)), ["4"]),
        (sampler(four=(0.32, 6.31)), ["4"]),
    ],
)
def test_sampler_rule_fails_exactly_the_line_that_does_not_hold(cand, failed):
    lines = campaign.sampler_rule(cand, sampler())
    assert [name.split()[0] for name, (ok, _) in lines.items() if not ok] == failed


def test_judge_of_the_control_writes_the_bar_and_marks_early_exports_interim(tmp_path, monkeypatch):
    folder = tmp_path / "control"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"control weights")
    monkeypatch.setattr(campaign, "LOGS", tmp_path)
    methods = {"default": realesrgan(), "control-m48": realesrgan(lpips=0.35, niqe=(7.5,))}
    for name, means in methods.items():
        res = {"config": {"model_folder": str(folder)}, "methods": [{"name": k, "means": v} for k, v in means.items()]}
        (tmp_path / f"eval-{name}-realesrgan.json").write_text(json.dumps(res))
    (tmp_path / "seam-control-m48.json").write_text(json.dumps({"sha256": campaign.weights_sha(folder)}))
    monkeypatch.setattr(campaign, "ROOT", tmp_path)
    v = campaign.judge("control-m48")
    assert (v["verdict"], v["holds"]) == ("interim", True) and "ships" not in v
    assert json.loads((tmp_path / "judge-control-m48.json").read_text()) == v


def test_curve_plots_campaign_and_control_exports_only(tmp_path, monkeypatch):
    logs = tmp_path / "campaign"
    (tmp_path / "study").mkdir(parents=True)
    logs.mkdir()
    one = {k: 0.3 for k in campaign.KEYS}
    study = {name: {"30": one} for name in ("hybrid-m", "conv")}
    (tmp_path / "study" / "study.json").write_text(json.dumps({"table": {"realesrgan": study}}))
    evals = {  # every kind of eval name RULE.md's addenda give; only m<N> and control-m<N> are curve points
        "m410": 0.33,
        "m1833": 0.31,
        "control-m48": 0.35,
        "default": 0.31,
        "teasr-tiny": 0.38,
        "sampler-nocf": 0.30,
    }
    for name, lpips in evals.items():
        methods = {"teasr 1 step": {**one, "lpips": lpips}, "bicubic": one, "realesrgan": one}
        res = {"methods": [{"name": k, "means": v} for k, v in methods.items()]}
        (logs / f"eval-{name}-realesrgan.json").write_text(json.dumps(res))
    monkeypatch.setattr(campaign, "LOGS", logs)
    assert campaign.curve() == {"hybrid-m": {30: 0.3, 410: 0.33, 1833: 0.31}, "conv control": {48: 0.35}}
    assert (logs / "campaign.png").stat().st_size > 0


def test_fold_swaps_in_the_export_and_joins_the_logs(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("astronaut", "coffee"):
        Image.fromarray(getattr(skdata, name)()).save(photos / f"{name}.png")
    fast = dict(degradation="bicubic", lpips="", threads=1, sample_every=0, log_every=1, seed=0, crop=32)
    model = dict(hidden_size=32, depth=1, num_heads=2, patch_size=2)
    runs = []
    for i, stage in enumerate(("prior", "sad")):
        init = str(tmp_path / "run0" / "model") if i else None
        cfg = TrainConfig.load(None, data=str(photos), out=str(tmp_path / f"run{i}"), model=model, stage=stage,
                               init=init, steps=2 + i, batch_size=1, **fast)  # fmt: skip
        train(cfg)
        runs.append(tmp_path / f"run{i}")
        with open(runs[-1] / "metrics.jsonl", "a") as f:  # as if each had run for minutes: 2, then 3
            f.write(json.dumps({"step": 2 + i, "cpu_s": 120.0 + 60 * i}) + "\n")
    folder = tmp_path / "campaign"
    folder.mkdir()
    (folder / "metrics.jsonl").write_text((runs[0] / "metrics.jsonl").read_text())
    (folder / "stale.txt").write_text("from the last fold")
    control = folder / "control"

    assert campaign.fold(runs[0], control) == 2  # a chain's first fold: no folder, no earlier log
    assert campaign.fold(runs[1], folder) == 2 + 3  # the minutes the weights carry, over the whole chain

    assert sorted(p.name for p in tmp_path.iterdir()) == ["campaign", "photos", "run0", "run1"]  # no .new/.old left
    assert {p.name for p in folder.iterdir()} == {
        "README.md",
        "config.json",
        "control",  # carried over, not dropped with the old folder
        "model.safetensors",
        "metrics.jsonl",
        "train_config.json",
    }
    assert (control / "metrics.jsonl").read_text() == (runs[0] / "metrics.jsonl").read_text()
    load_pretrained(control)
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    assert lines == "".join((r / "metrics.jsonl").read_text() for r in runs).splitlines()
    assert json.loads((folder / "train_config.json").read_text())["stage"] == "sad"
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    load_pretrained(folder)  # a model folder `teasr upscale -m` takes
    chain = campaign.chain([json.loads(line) for line in lines])
    assert [(r["run"], r["stage"], r["steps"]) for r in chain] == [(str(runs[0]), "prior", 2), (str(runs[1]), "sad", 3)]
    card = (folder / "README.md").read_text()
    assert card.splitlines()[card.splitlines().index("---", 1) + 2] == "# campaign"
    assert f"| {runs[0]} | prior | 2 |" in card and f"| {runs[1]} | sad | 3 |" in card
    assert card.count(f" | {runs[0] / 'model'} |") == 1 and " | - |" in card  # what each run started from


@pytest.mark.parametrize(
    "grid, later_weights, refusal",
    [
        ({"16/4": 1.0}, b"weights of a later fold", "not the weights evaluated as m1"),  # a fold since `eval`
        ({"16": 1.0, "4": 1.0}, None, "before RULE.md's addendum 1"),  # no 16/4 ratio recorded
    ],
)
def test_judge_refuses_what_it_cannot_judge(tmp_path, monkeypatch, grid, later_weights, refusal):
    folder = tmp_path / "campaign"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"weights evaluated")
    monkeypatch.setattr(campaign, "LOGS", tmp_path)
    (tmp_path / "eval-m1-realesrgan.json").write_text(json.dumps({"config": {"model_folder": str(folder)}}))
    seam = {"sha256": campaign.weights_sha(folder), "grid_ratio": {"model": grid}}
    (tmp_path / "seam-m1.json").write_text(json.dumps(seam))
    if later_weights:
        (folder / "model.safetensors").write_bytes(later_weights)
    with pytest.raises(SystemExit, match=refusal):
        campaign.judge("m1")


def test_token_grid_ratio_sees_a_token_grid_and_not_the_lr_pixel_grid():
    from seam_check import grid_ratio, token_grid_ratio

    # Stationary content, so that every 4-px border sees the same statistics: smoothed LR noise, bicubic x4 (no
    # token grid, but the 4-px grid of the LR pixels).
    lr = Image.fromarray(np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8))
    up = lr.filter(ImageFilter.GaussianBlur(1)).resize((512, 512), Image.BICUBIC)
    assert grid_ratio(up, 16) > 1.02  # the plain 16-px ratio counts the LR grid
    assert token_grid_ratio(up) == pytest.approx(1.0, abs=0.01)
    y = np.asarray(up, dtype=np.float64)
    tiles = y + 2.0 * ((np.arange(512) // 16) % 2)[None, :, None]  # a 16-px stripe of tokens offset in x
    assert token_grid_ratio(Image.fromarray(tiles.clip(0, 255).astype(np.uint8))) > 1.1
