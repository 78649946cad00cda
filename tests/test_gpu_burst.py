"""The GPU burst (train/gpu_burst.sh and its parts): the payload fits the device, the CPU rehearsal writes every
artefact the device run would, within the device's limits on what comes back, and the fold rule reads right."""

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "train"))
import cuda_checks  # noqa: E402
import fold_burst  # noqa: E402
import gpu_train  # noqa: E402
import make_pack  # noqa: E402
import payload  # noqa: E402

from teasr_cli.cli import app  # noqa: E402


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    cmd = ["bash", str(ROOT / "train/gpu_burst.sh"), "--dry-run", "--within", "3600", "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    return r, out


def test_dry_run_passes_and_the_payload_fits(dry_run):
    r, _ = dry_run
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    line = re.search(r"payload: ([\d.]+) MiB of 64.0 MiB -> fits", r.stdout)
    assert line and float(line.group(1)) <= 64
    assert re.search(r"training bound: 0.1 min", r.stdout)  # --within: the smaller of the two bounds


def test_dry_run_writes_every_artefact_within_the_device_limits(dry_run):
    _, out = dry_run
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    names = {str(p) for p in files}
    assert {"burst.log", "checks.json", "burst.json", "model/config.json", "model/metrics.jsonl"} <= names
    assert any(n.startswith("model/model.safetensors.") for n in names)
    # what the device returns: at most 8 files of 16 MiB, 2 folders down, names of letters, digits, . _ -
    assert len(files) <= 8
    assert all((out / p).stat().st_size <= 16 * 2**20 for p in files)
    assert all(len(p.parts) <= 3 and all(re.fullmatch(r"[A-Za-z0-9._-]+", s) for s in p.parts) for p in files)


def test_checks_report_every_check_and_none_fails_on_the_cpu(dry_run):
    _, out = dry_run
    checks = json.loads((out / "checks.json").read_text())
    assert checks["cuda"] is False
    assert set(checks["checks"]) == set(cuda_checks.CHECKS)
    status = {k: v["status"] for k, v in checks["checks"].items()}
    assert status["accelerate-launch"] == "PASS"  # runs for real on the CPU too
    assert all(s == "SKIP" for k, s in status.items() if k != "accelerate-launch"), status
    log = (out / "burst.log").read_text()
    assert "== gpu_burst done" in log.splitlines()[-1]  # the whole log, to its last line
    assert all(f"SKIP {k}:" in log for k, s in status.items() if s == "SKIP")


def test_burst_model_reassembles_into_a_loadable_model(dry_run, tmp_path):
    _, out = dry_run
    burst = json.loads((out / "burst.json").read_text())
    assert burst["steps"] >= 1 and burst["samples_s_median"] > 0 and burst["loader_samples_s"] > 0
    assert burst["gpu_peak_gib"] is None and burst["train_config"]["stage"] == burst["stage"]
    recs = [json.loads(ln) for ln in (out / "model/metrics.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "budget" for r in recs)  # stopped by the time bound, not the step count
    model_dir = tmp_path / "m"
    fold_burst.assemble(out, model_dir)
    assert hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest() == burst["weights"]["sha256"]
    assert json.loads((model_dir / "config.json").read_text())["trained"]["steps"] == burst["steps"]
    Image.fromarray(np.asarray(skdata.astronaut())[::16, ::16]).save(tmp_path / "small.png")  # 32x32
    r = CliRunner().invoke(
        app,
        [
            "upscale",
            str(tmp_path / "small.png"),
            "-o",
            str(tmp_path / "big.png"),
            "--model",
            str(model_dir),
            "--device",
            "cpu",
        ],
    )
    assert r.exit_code == 0, r.output
    big = np.asarray(Image.open(tmp_path / "big.png"))
    assert big.shape == (128, 128, 3) and big.std() > 10  # a picture, not a flat or NaN-black image


def test_parts_that_do_not_add_up_are_refused(dry_run, tmp_path):
    _, out = dry_run
    copy = tmp_path / "files"
    (copy / "model").mkdir(parents=True)
    for p in out.rglob("*"):
        if p.is_file():
            (copy / p.relative_to(out)).write_bytes(p.read_bytes())
    part = sorted((copy / "model").glob("model.safetensors.*"))[-1]
    part.write_bytes(part.read_bytes()[:-1])
    with pytest.raises(SystemExit, match="SHA-256"):
        fold_burst.assemble(copy, tmp_path / "m")


def test_payload_counts_the_tree_and_carried_paths_once(tmp_path):
    git = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    (tmp_path / ".gitignore").write_text("/pack/\n*.tmp\n")
    (tmp_path / "a.py").write_bytes(b"x" * 1000)
    git("add", ".gitignore", "a.py")
    (tmp_path / "new.txt").write_bytes(b"y" * 300)  # untracked, not ignored: it travels
    (tmp_path / "junk.tmp").write_bytes(b"z" * 5000)  # ignored: it stays
    (tmp_path / "pack").mkdir()
    (tmp_path / "pack" / "p.jpg").write_bytes(b"p" * 7000)
    tree = 1000 + 300 + len("/pack/\n*.tmp\n")
    assert payload.measure([], tmp_path)["total_bytes"] == tree
    r = payload.measure(["pack", "a.py", "gone"], tmp_path)  # a.py is in the tree already: counted once
    assert r["total_bytes"] == tree + 7000 and r["missing_carry"] == ["gone"] and r["fits"]
    (tmp_path / "pack" / "huge.bin").write_bytes(b"h" * (payload.LIMIT - tree - 7000 + 1))
    assert not payload.measure(["pack"], tmp_path)["fits"]


def test_pack_takes_the_best_encoding_that_fits():
    photos = make_pack.skimage_photos()
    assert "coffee" not in photos  # held out for validation by prepare_photos
    enc, tried = make_pack.plan(photos, 10**9)
    assert tried[-1]["format"] == "png" and len(enc) == len(photos)
    png = tried[-1]["bytes"]
    enc, tried = make_pack.plan(photos, png // 2)
    chosen = tried[-1]
    assert chosen["format"].startswith("jpeg-q") and chosen["bytes"] <= png // 2
    assert all(t["bytes"] > png // 2 for t in tried[:-1])  # every better encoding was measured too big
    assert chosen["psnr_db"] > 38
    enc, tried = make_pack.plan(photos, png // 8)  # q90 too big: smaller crops, still q90
    assert tried[-1]["format"] == "jpeg-q90" and "area" in tried[-1] and tried[-1]["bytes"] <= png // 8
    im = Image.open(__import__("io").BytesIO(next(iter(enc.values()))))
    assert im.format == "JPEG" and min(im.size) >= 256


def test_burst_takes_the_objective_from_the_campaign(tmp_path):
    camp = tmp_path / "campaign"
    camp.mkdir()
    assert gpu_train.start_point(camp) == (gpu_train.SHIPPED, {})  # no model there yet
    for f in ("config.json", "model.safetensors"):
        (camp / f).write_bytes((gpu_train.SHIPPED / f).read_bytes())
    saved = {
        "stage": "prior",
        "ema": 0.999,
        "lora_rank": 8,
        "batch_size": 6,
        "crop": 128,
        "lr": 3e-4,
        "lora_lr": 5e-5,
        "degradation": "mild",
        "sad": {"lambda_rect": 0.0},
        "workers": 0,
    }
    (camp / "train_config.json").write_text(json.dumps(saved))
    init, campaign_cfg = gpu_train.start_point(camp)
    assert init == camp
    cfg = gpu_train.burst_config(gpu_train.RECIPE, init, campaign_cfg, "d", "o", 3.0)
    recipe = gpu_train.trainer.TrainConfig.load(str(gpu_train.RECIPE), data="d", init="m")
    assert (cfg.stage, cfg.ema, cfg.lora_rank, cfg.degradation, cfg.sad.lambda_rect) == ("prior", 0.999, 8, "mild", 0.0)
    assert (cfg.batch_size, cfg.crop, cfg.lr, cfg.lora_lr) == (recipe.batch_size, recipe.crop, recipe.lr, 1e-4)
    assert cfg.mixed_precision == "bf16"
    assert cfg.max_minutes == 3.0 and cfg.init == str(camp) and cfg.model == {}  # the architecture is --init's


def test_loader_workers_fit_in_shared_memory():
    assert gpu_train.shm_workers(64, 256, 64 * 2**20) == 0  # a container's default /dev/shm: no workers
    assert gpu_train.shm_workers(64, 256, 64 * 2**30) >= 14  # the H200 machine's RAM: the recipe's 14
    # workers x prefetch x batch bytes stays within half of what is free
    n = gpu_train.shm_workers(8, 128, 2**30)
    assert n * 4 * 8 * 3 * 128**2 * 4 * 1.25 <= 2**29 < (n + 1) * 4 * 8 * 3 * 128**2 * 4 * 1.25


def _scores(lpips, vgg, dists, psnr, bic=27.0):
    return {
        k: {"lpips": lpips, "lpips-vgg": vgg, "dists": dists, "psnr": psnr, "bicubic_psnr": bic}
        for k in fold_burst.KINDS
    }


def test_fold_rule():
    cur = _scores(0.40, 0.50, 0.30, 26.5)
    assert fold_burst.verdict(_scores(0.39, 0.49, 0.29, 26.5), cur)[0]
    assert not fold_burst.verdict(_scores(0.41, 0.49, 0.29, 26.5), cur)[0]  # headline LPIPS worse
    assert not fold_burst.verdict(_scores(0.39, 0.51, 0.31, 26.5), cur)[0]  # 3 of 9 perceptual wins
    assert not fold_burst.verdict(_scores(0.39, 0.49, 0.29, 25.9), cur)[0]  # PSNR under bicubic - 1 and current
    assert fold_burst.verdict(_scores(0.39, 0.49, 0.29, 26.1), cur)[0]  # lower PSNR, still within the bar
