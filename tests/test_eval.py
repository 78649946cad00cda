"""`teasr eval`: benchmark pairs (folders, on-the-fly degradation, the Hub zip), scoring, resume,
results files and the CLI, on small real photos with a tiny saved model."""

import csv
import io
import json
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line_error, small_photo, to_tensor
from hubserver import point_hub_at, serve_hub
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio
from typer.testing import CliRunner

from teasr_cli import benchsets
from teasr_cli import evaluation as ev
from teasr_cli.benchsets import DatasetError, pair_folders
from teasr_cli.cli import app

FAST = ["--device", "cpu", "--threads", "1"]
PHOTOS = ("astronaut", "chelsea", "coffee")
ALL_METRICS = "psnr,ssim,lpips,dists,niqe,fid"


@pytest.fixture(autouse=True)
def no_fid_download(monkeypatch):
    # The FID Inception weights come from the Hub on first use; here they are never reachable,
    # and a missing file makes FID "unavailable" at once instead of after a network timeout.
    monkeypatch.setenv("TEASR_FID_WEIGHTS", "/nonexistent/fid_inception.safetensors")


@pytest.fixture
def cli(tiny_model_dir):
    runner = CliRunner()

    def invoke(*args, model=True):
        extra = ["--model", str(tiny_model_dir), *FAST] if model else []
        return runner.invoke(app, ["eval", *map(str, args), *extra])

    return invoke


def save_photos(folder: Path, size=(64, 64), names=PHOTOS, fmt="{}.png") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        small_photo(n, size).save(folder / fmt.format(n))
    return folder


def strict_json(path: Path):
    """json.loads that refuses the non-standard Infinity/NaN tokens."""

    def refuse(token):
        raise AssertionError(f"{path.name} holds the non-JSON token {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


class MemPair:
    """An in-memory pair whose HQ is the nearest-neighbour x4 of its LQ: a nearest-neighbour
    "method" then reproduces the HQ exactly."""

    def __init__(self, name, size=(40, 36)):
        self.name = name
        self.lq = to_tensor(small_photo(name, size))
        self.hq = F.interpolate(self.lq, scale_factor=4, mode="nearest")
        self.loads = 0

    def load(self):
        self.loads += 1
        return self.lq, self.hq


def counted(name, fn, config=None):
    calls = []

    def run(lq):
        calls.append(1)
        return fn(lq)

    return ev.Method(name, run, None, config or {}), calls


def nearest(lq):
    return F.interpolate(lq, scale_factor=4, mode="nearest")


# ------------------------------------------------------------------ CLI end to end


def test_cli_end_to_end_on_degraded_real_photos(cli, tmp_path):
    hq = save_photos(tmp_path / "hq")
    out = tmp_path / "out"
    result = cli(
        "--hq",
        hq,
        "--degrade",
        "bicubic",
        "--steps",
        "1,2",
        "--baseline",
        "bicubic,lanczos",
        "--metrics",
        ALL_METRICS,
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    text = result.output
    for word in (
        "PSNR",
        "SSIM",
        "LPIPS",
        "DISTS",
        "NIQE",
        "FID",
        "teasr 1 step",
        "teasr 2 steps",
        "bicubic",
        "lanczos",
    ):
        assert word in text, text
    assert "fid: n/a" in text and "niqe: n/a" in text  # unavailable metrics are said so, with a reason

    res = strict_json(out / "results.json")
    names = [m["name"] for m in res["methods"]]
    assert names == ["teasr 1 step", "teasr 2 steps", "bicubic", "lanczos"]
    assert [m["steps"] for m in res["methods"]] == [1, 2, None, None]
    assert res["metrics"] == ALL_METRICS.split(",")
    assert res["config"]["images"] == 3 and res["config"]["degrade"] == "bicubic" and res["config"]["steps"] == [1, 2]
    for m in res["methods"]:
        means = m["means"]
        assert 5 < means["psnr"] < 60 and 0 < means["ssim"] <= 1 and means["lpips"] >= 0 and means["dists"] >= 0
        assert (
            means["fid"] is None and means["niqe"] is None
        )  # no Inception weights; 64x64 is below NIQE's 96x96 blocks
    assert "FID unavailable" in res["unavailable"]["fid"] and "too small" in res["unavailable"]["niqe"]
    assert set(res["per_image"]["bicubic"]) == set(PHOTOS)
    # bicubic is a faithful (if blurry) baseline: on a bicubic-downscaled photo it beats nothing by much,
    # but it must beat the untrained tiny model, which outputs noise
    by = {m["name"]: m["means"] for m in res["methods"]}
    assert by["bicubic"]["psnr"] > by["teasr 1 step"]["psnr"]

    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == names and rows[0]["steps"] == "1" and rows[2]["steps"] == ""
    assert float(rows[2]["psnr"]) == pytest.approx(by["bicubic"]["psnr"]) and rows[2]["fid"] == ""

    with Image.open(out / "metrics_vs_steps.png") as png:
        assert png.format == "PNG" and png.size[0] > 400 and png.size[1] > 300
    assert len((out / ev.PER_IMAGE).read_text().splitlines()) == 3 * 4


def test_cli_rerun_resumes_and_reuses_valid_rows(cli, tmp_path):
    hq = save_photos(tmp_path / "hq", names=PHOTOS[:2])
    out = tmp_path / "out"
    args = ("--hq", hq, "--degrade", "mild", "--metrics", "psnr,ssim", "--out", out)
    assert cli(*args, "--steps", "1").exit_code == 0
    first = strict_json(out / "results.json")
    result = cli(*args, "--steps", "1,2")  # only "teasr 2 steps" is new
    assert result.exit_code == 0, result.output
    assert "6 of 8 results resumed" in result.output  # 2 images x (teasr 1 step, bicubic, lanczos)
    second = strict_json(out / "results.json")
    assert second["methods"][0] == first["methods"][0] and second["methods"][2:] == first["methods"][1:]
    assert len((out / ev.PER_IMAGE).read_text().splitlines()) == 8
    # another --degrade-seed is other data: nothing may be reused
    result = cli(*args, "--steps", "1", "--degrade-seed", "1")
    assert result.exit_code == 0 and "resumed" not in result.output, result.output


def test_cli_save_images_and_limit(cli, tmp_path):
    hq = save_photos(tmp_path / "hq")
    out = tmp_path / "out"
    result = cli(
        "--hq",
        hq,
        "--degrade",
        "bicubic",
        "--steps",
        "1",
        "--baseline",
        "none",
        "--metrics",
        "psnr",
        "--limit",
        "2",
        "--save-images",
        "--out",
        out,
    )
    assert result.exit_code == 0, result.output
    saved = sorted(p.name for p in (out / "images" / "teasr_1_step").iterdir())
    assert saved == ["astronaut.png", "chelsea.png"]
    with Image.open(out / "images" / "teasr_1_step" / "astronaut.png") as img:
        assert img.size == (64, 64)
    assert [m["name"] for m in strict_json(out / "results.json")["methods"]] == ["teasr 1 step"]


# ------------------------------------------------------------------ bad input: one-line errors


def _mismatched(tmp_path):
    save_photos(tmp_path / "lq", (16, 16), names=("astronaut", "chelsea"))
    save_photos(tmp_path / "hq", (64, 64), names=("astronaut", "coffee"))
    return "--lq", tmp_path / "lq", "--hq", tmp_path / "hq"


def _wrong_ratio(tmp_path):
    save_photos(tmp_path / "lq", (16, 16), names=("astronaut", "chelsea"))
    save_photos(tmp_path / "hq", (64, 64), names=("astronaut",))
    small_photo("chelsea", (48, 64)).save(tmp_path / "hq" / "chelsea.png")
    return "--lq", tmp_path / "lq", "--hq", tmp_path / "hq"


def _empty(tmp_path):
    (tmp_path / "lq").mkdir()
    save_photos(tmp_path / "hq")
    (tmp_path / "lq" / "notes.txt").write_text("not an image")
    return "--lq", tmp_path / "lq", "--hq", tmp_path / "hq"


@pytest.mark.parametrize(
    "make,words",
    [
        (lambda t: ("--lq", t / "nope", "--hq", save_photos(t / "hq")), ["LQ folder", "nope", "does not exist"]),
        (_empty, ["LQ folder", "has no images"]),
        (_mismatched, ["do not match", "chelsea.png", "coffee.png"]),
        (_wrong_ratio, ["exactly 4x", "chelsea (LQ 16x16, HQ 48x64)"]),
        (
            lambda t: (
                "--lq",
                save_photos(t / "lq"),
            ),
            ["--lq needs --hq"],
        ),
        (lambda t: (), ["--dataset NAME", "--lq DIR --hq DIR", "--degrade PRESET"]),
        (lambda t: ("--hq", save_photos(t / "hq")), ["--degrade"]),
        (lambda t: ("--hq", save_photos(t / "hq"), "--degrade", "blurry"), ["unknown --degrade", "realesrgan"]),
        (lambda t: ("--dataset", "set14"), ["unknown dataset", "realsr", "div2k-val"]),
        (lambda t: ("--dataset", "realsr", "--hq", t), ["cannot be combined"]),
        (lambda t: ("--hq", t, "--degrade", "bicubic", "--steps", "1,x"), ["--steps", "whole numbers"]),
        (lambda t: ("--hq", t, "--degrade", "bicubic", "--steps", "0"), ["--steps", "at least 1"]),
        (
            lambda t: ("--hq", t, "--degrade", "bicubic", "--metrics", "psnr,musiq"),
            ["unknown metric", "musiq", "lpips"],
        ),
        (lambda t: ("--hq", t, "--degrade", "bicubic", "--baseline", "nearest"), ["unknown baseline", "lanczos"]),
    ],
)
def test_bad_inputs_give_one_line_errors(cli, tmp_path, make, words):
    args = make(tmp_path)
    assert_one_line_error(cli(*args, "--out", tmp_path / "out"), *words)
    assert not (tmp_path / "out").exists()


def test_a_failing_method_keeps_finished_rows_and_says_how_to_resume(cli, tmp_path, monkeypatch):
    hq = save_photos(tmp_path / "hq")
    out = tmp_path / "out"
    real = ev.baseline

    def flaky(name, scale=4):
        m = real(name, scale)
        if name == "lanczos":
            seen = []
            m.fn = lambda lq: seen.append(1) or (lq if len(seen) > 1 else real(name).fn(lq))  # wrong size on image 2
        return m

    monkeypatch.setattr(ev, "baseline", flaky)
    result = cli("--hq", hq, "--degrade", "bicubic", "--steps", "1", "--metrics", "psnr", "--out", out)
    assert_one_line_error(result, "method 'lanczos' returned", "chelsea", "run again to resume")
    assert (
        len((out / ev.PER_IMAGE).read_text().splitlines()) == 3 + 2
    )  # image 1: all 3 methods; image 2: teasr, bicubic


# ------------------------------------------------------------------ evaluate(): values, resume


def test_identical_images_give_inf_psnr_ssim_one_lpips_zero(tmp_path):
    pairs = [MemPair("astronaut"), MemPair("coffee")]
    res = ev.evaluate(
        pairs,
        {"nearest": nearest, "bicubic": ev.baseline("bicubic")},
        ["psnr", "ssim", "lpips", "dists"],
        tmp_path,
        config={"dataset": "identical"},
    )
    same = res.means["nearest"]
    assert same["psnr"] == float("inf") and same["ssim"] == pytest.approx(1.0, abs=1e-12)
    assert same["lpips"] == pytest.approx(0.0, abs=1e-6) and same["dists"] == pytest.approx(0.0, abs=1e-5)
    assert res.best("psnr") == "nearest" and res.best("lpips") == "nearest"
    # +inf is written as the string "inf", which strict JSON parsers accept and float() reads back
    saved = strict_json(tmp_path / "results.json")
    assert saved["methods"][0]["means"]["psnr"] == "inf" and float(saved["methods"][0]["means"]["psnr"]) == float("inf")
    assert saved["per_image"]["nearest"]["coffee"]["psnr"] == "inf"
    assert next(csv.DictReader(open(tmp_path / "results.csv")))["psnr"] == "inf"
    assert 20 < res.means["bicubic"]["psnr"] < 40 and 0 < res.means["bicubic"]["lpips"] < 1
    # the plot leaves out what it cannot draw (an infinite PSNR line) but is still written
    assert (tmp_path / "metrics_vs_steps.png").stat().st_size > 1000


def test_hr_row_scores_the_ground_truth_itself(tmp_path):
    from teasr_cli.metrics.nss import niqe

    pairs = [MemPair(n, (56, 56)) for n in ("astronaut", "coffee")]  # HQ 224x224: NIQE needs 96x192
    res = ev.evaluate(pairs, [ev.baseline("hr"), ev.baseline("bicubic")], ["psnr", "lpips", "niqe"], tmp_path)
    hr = res.means["hr"]
    assert hr["psnr"] == float("inf") and hr["lpips"] == pytest.approx(0.0, abs=1e-6)
    # its NIQE is the photos' own, the reference a method's no-reference score can be read against
    assert hr["niqe"] == pytest.approx(float(niqe(torch.cat([p.hq for p in pairs])).mean()), rel=1e-12)
    assert abs(res.means["bicubic"]["niqe"] - hr["niqe"]) > 0.1
    assert res.best("psnr") == res.best("lpips") == "bicubic"  # the reference is no competitor
    assert res.steps["hr"] is None and ev.parse_list("bicubic,hr", ev.BASELINES, "baseline") == ["bicubic", "hr"]


@pytest.mark.parametrize("crop", [0, 4])
def test_psnr_matches_an_independent_computation(tmp_path, crop):
    pair = MemPair("chelsea", (48, 40))
    res = ev.evaluate([pair], [ev.baseline("lanczos")], ["psnr"], tmp_path, crop_border=crop)
    sr = ev.baseline("lanczos").fn(pair.lq)[0].double().numpy()
    hq = pair.hq[0].double().numpy()

    def y(x):  # BT.601 luma on the [16, 235] scale, as SR papers
        x = 16 + 65.481 * x[0] + 128.553 * x[1] + 24.966 * x[2]
        return x[crop:-crop, crop:-crop] if crop else x

    expected = peak_signal_noise_ratio(y(hq), y(sr), data_range=255)
    assert res.per_image["lanczos"]["chelsea"]["psnr"] == pytest.approx(expected, rel=1e-9)


def test_baselines_upscale_without_rounding_and_differ():
    lq = to_tensor(small_photo("coffee", (24, 20)))
    bic, lan = ev.baseline("bicubic").fn(lq), ev.baseline("lanczos").fn(lq)
    assert bic.shape == lan.shape == (1, 3, 80, 96)
    assert not torch.equal(bic, lan) and (bic * 255 - (bic * 255).round()).abs().max() > 0.01  # float, not 8-bit
    ref = to_tensor(small_photo("coffee", (24, 20)).resize((96, 80), Image.Resampling.BICUBIC))
    diff = (bic - ref).abs()  # Pillow's 8-bit bicubic rounds (and clips overshoot) between its two passes
    assert diff.mean() < 0.5 / 255 and diff.max() < 8 / 255
    with pytest.raises(ev.EvalError, match="unknown baseline"):
        ev.baseline("nearest")


def test_resume_recomputes_only_missing_items(tmp_path):
    pairs = [MemPair(n) for n in PHOTOS]
    m1, calls1 = counted("nearest", nearest)
    m2, calls2 = counted("bicubic", ev.baseline("bicubic").fn)
    first = ev.evaluate(pairs, [m1, m2], ["psnr", "ssim"], tmp_path, config={"data": "mem"})
    assert (len(calls1), len(calls2)) == (3, 3) and first.computed == 6
    log = tmp_path / ev.PER_IMAGE
    lines = log.read_text().splitlines(keepends=True)
    (tmp_path / "results.json").unlink()
    # a kill: half the rows made it to disk, plus half a line
    log.write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    calls1.clear(), calls2.clear()
    loads = [p.loads for p in pairs]
    second = ev.evaluate(pairs, [m1, m2], ["psnr", "ssim"], tmp_path, config={"data": "mem"})
    assert len(calls1) + len(calls2) == 3 and second.computed == 3
    assert [p.loads - n for p, n in zip(pairs, loads)] == [0, 1, 1]  # image 1 was complete: not even loaded
    assert second.means == first.means and second.per_image == first.per_image
    assert (tmp_path / "results.json").exists()
    assert all(json.loads(line) for line in log.read_text().splitlines())  # the partial line is gone
    # a third run computes nothing; a method whose config changed is recomputed
    calls1.clear(), calls2.clear()
    assert ev.evaluate(pairs, [m1, m2], ["psnr", "ssim"], tmp_path, config={"data": "mem"}).computed == 0
    m1.config = {"version": 2}
    assert ev.evaluate(pairs, [m1, m2], ["psnr", "ssim"], tmp_path, config={"data": "mem"}).computed == 3
    # asking for one more metric computes just that (the SR image is needed again, the others are kept)
    third = ev.evaluate(pairs, [m1, m2], ["psnr", "ssim", "lpips"], tmp_path, config={"data": "mem"})
    assert third.computed == 6 and third.means["bicubic"]["psnr"] == first.means["bicubic"]["psnr"]


def test_fid_with_weights_is_computed_and_resumes(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from teasr_cli.metrics import FIDInceptionV3

    # random weights (the real ones cannot be downloaded here: the plumbing is what is tested), drawn so that
    # activations keep their scale through the 90-odd layers and the features tell images apart
    torch.manual_seed(0)
    net = FIDInceptionV3()
    for mod in net.modules():
        if isinstance(mod, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
    weights = tmp_path / "fid.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    monkeypatch.setenv("TEASR_FID_WEIGHTS", str(weights))
    pairs = [MemPair("astronaut", (20, 20)), MemPair("chelsea", (20, 20))]
    m, calls = counted("nearest", nearest)
    res = ev.evaluate(pairs, [m, ev.baseline("bicubic")], ["psnr", "fid"], tmp_path / "out")
    assert res.means["nearest"]["fid"] == pytest.approx(0.0, abs=1e-3)  # identical sets
    assert res.means["bicubic"]["fid"] > 0.1 and "fid" not in res.unavailable
    assert len(list((tmp_path / "out" / "fid_features").rglob("*.npy"))) == 3 * 2
    calls.clear()
    again = ev.evaluate(pairs, [m, ev.baseline("bicubic")], ["psnr", "fid"], tmp_path / "out")
    assert not calls and again.means["bicubic"]["fid"] == pytest.approx(res.means["bicubic"]["fid"], rel=1e-9)


def test_unavailable_metrics_are_never_filled_in(tmp_path):
    pairs = [MemPair("astronaut", (16, 16))]  # 64x64: too small for NIQE; one image: FID has no covariance
    res = ev.evaluate(pairs, {"nearest": nearest}, ["psnr", "niqe", "fid"], tmp_path)
    assert res.means["nearest"]["niqe"] is None and res.means["nearest"]["fid"] is None
    assert "too small" in res.unavailable["niqe"] and "FID unavailable" in res.unavailable["fid"]
    saved = strict_json(tmp_path / "results.json")
    assert saved["methods"][0]["means"]["niqe"] is None and saved["unavailable"]["niqe"]


def test_method_returning_the_wrong_size_is_a_clear_error(tmp_path):
    with pytest.raises(ev.EvalError, match=r"method 'identity' returned \(1, 3, 36, 40\).*expected \(1, 3, 144, 160\)"):
        ev.evaluate([MemPair("coffee")], {"identity": lambda lq: lq}, ["psnr"], tmp_path)


def test_parse_steps_and_lists():
    assert ev.parse_steps("8,1, 2,4,2") == [1, 2, 4, 8]
    assert ev.parse_list("LPIPS, psnr,lpips", ev.available_metrics(), "metric") == ["lpips", "psnr"]
    assert ev.parse_list("none", ev.BASELINES, "baseline") == []
    for bad in ("", "a", "1.5", "-1", "0,1"):
        with pytest.raises(ev.EvalError, match="--steps"):
            ev.parse_steps(bad)


# ------------------------------------------------------------------ pairing and synthetic LQ


def save_as(folder: Path, names, size, photo="astronaut") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        small_photo(photo, size).save(folder / n)


def test_pairing_tolerates_lr_hr_name_tokens(tmp_path):
    lq, hq = tmp_path / "lq", tmp_path / "hq"
    save_as(lq, ("Canon_003_LR4.png", "0801x4.png", "same.png"), (8, 8))
    save_as(hq, ("Canon_003_HR.png", "0801.png", "same.png"), (32, 32))
    (lq / ".DS_Store").write_bytes(b"junk")
    pairs = pair_folders(lq, hq)
    assert [(p.name, p.lq.name, p.hq.name) for p in pairs] == [
        ("0801", "0801x4.png", "0801.png"),
        ("Canon_003", "Canon_003_LR4.png", "Canon_003_HR.png"),
        ("same", "same.png", "same.png"),
    ]
    lq_img, hq_img = pairs[0].load()
    assert lq_img.shape == (1, 3, 8, 8) and hq_img.shape == (1, 3, 32, 32)


def test_pairing_refuses_two_files_for_one_image(tmp_path):
    lq, hq = tmp_path / "lq", tmp_path / "hq"
    save_as(lq, ("a.png", "a.jpg"), (8, 8))
    save_as(hq, ("a.png",), (32, 32))
    with pytest.raises(DatasetError, match="a.jpg and a.png name the same image"):
        pair_folders(lq, hq)


def test_wrong_size_is_also_caught_when_loading(tmp_path):
    save_photos(tmp_path / "lq", (8, 8), names=("astronaut",))
    save_photos(tmp_path / "hq", (30, 32), names=("astronaut",))
    (pair,) = pair_folders(tmp_path / "lq", tmp_path / "hq")
    with pytest.raises(DatasetError, match=r"pair 'astronaut': HQ astronaut.png is 30x32 .* exactly 4x"):
        pair.load()


def test_synthetic_pairs_are_seeded_per_image_and_cropped(tmp_path):
    hq = save_photos(tmp_path / "hq", (70, 66))
    pairs = benchsets.synthetic_pairs(hq, "realesrgan", seed=0)
    a1, h1 = pairs[0].load()
    a2, _ = pairs[0].load()
    assert h1.shape == (1, 3, 64, 68) and a1.shape == (1, 3, 16, 17)  # HQ cropped to a multiple of 4
    assert torch.equal(a1, a2) and torch.equal(a1 * 255, (a1 * 255).round())  # same every time, 8-bit values
    other_seed = benchsets.synthetic_pairs(hq, "realesrgan", seed=1)[0].load()[0]
    assert not torch.equal(a1, other_seed)
    assert benchsets.pair_seed(0, 0) != benchsets.pair_seed(0, 1) != benchsets.pair_seed(1, 0)
    bic, hb = benchsets.synthetic_pairs(hq, "bicubic")[1].load()
    ref = F.interpolate(hb, scale_factor=0.25, mode="bicubic", antialias=True, align_corners=False).clamp(0, 1)
    assert (bic - ref).abs().max() <= 0.5 / 255 + 1e-6


# ------------------------------------------------------------------ named sets from the Hub


def stablesr_zip(extra: dict | None = None) -> bytes:
    """A tiny zip with the StableSR test-set layout (RealSR/DRealSR: test_LR/test_HR, DIV2K: lq/gt)."""
    buf = io.BytesIO()

    def png(name, size):
        b = io.BytesIO()
        small_photo(name, size).save(b, "PNG")
        return b.getvalue()

    with zipfile.ZipFile(buf, "w") as zf:
        root = "StableSR_testsets"
        for folder, lq, hq in (
            ("RealSRVal_crop128", "test_LR", "test_HR"),
            ("DrealSRVal_crop128", "test_LR", "test_HR"),
            ("DIV2K_V2_val", "lq", "gt"),
        ):
            for i, photo in enumerate(("astronaut", "coffee")):
                zf.writestr(f"{root}/{folder}/{lq}/{i:04d}.png", png(photo, (16, 16)))
                zf.writestr(f"{root}/{folder}/{hq}/{i:04d}.png", png(photo, (64, 64)))
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_named_dataset_downloads_once_then_works_offline(cli, tmp_path, monkeypatch):
    from huggingface_hub import constants

    repo = f"datasets/{benchsets.REPO_ID}"
    with serve_hub({repo: {"main": {benchsets.ZIP_NAME: stablesr_zip()}}}) as (endpoint, hub):
        point_hub_at(monkeypatch, endpoint, tmp_path / "hf-cache")
        monkeypatch.chdir(tmp_path)  # the default output folder is eval_results/<dataset>
        result = cli("--dataset", "realsr", "--steps", "1", "--metrics", "psnr,ssim", "--baseline", "bicubic")
        assert result.exit_code == 0, result.output
        assert hub.count("/blobs/", "GET") == 1  # the zip's bytes (LFS: served by the "CDN")
        res = strict_json(tmp_path / "eval_results" / "realsr" / "results.json")
        assert res["config"]["images"] == 2 and res["config"]["data"]["dataset"] == "realsr"
        assert set(res["per_image"]["bicubic"]) == {"0000", "0001"}
        extracted = list((tmp_path / "hf-cache").glob("datasets--*/extracted/*/StableSR_testsets/DIV2K_V2_val/gt"))
        assert len(extracted) == 1
        marker = extracted[0].parent / "marker"
        marker.write_text("extracted once")
        requests = hub.count()
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        result = cli(
            "--dataset",
            "div2k-val",
            "--steps",
            "1",
            "--metrics",
            "psnr",
            "--baseline",
            "none",
            "--out",
            tmp_path / "div2k",
        )
        assert result.exit_code == 0, result.output
        assert hub.count() == requests and marker.read_text() == "extracted once"  # no request, no re-extraction
        assert strict_json(tmp_path / "div2k" / "results.json")["config"]["images"] == 2


def test_named_dataset_offline_with_a_cold_cache_is_one_line(cli, tmp_path, monkeypatch):
    from huggingface_hub import constants

    with serve_hub({}) as (endpoint, _):
        point_hub_at(monkeypatch, endpoint, tmp_path / "hf-cache")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        assert_one_line_error(
            cli("--dataset", "drealsr", "--out", tmp_path / "o"),
            "drealsr",
            "not in the local cache",
            "HF_HUB_OFFLINE",
            "--lq DIR --hq DIR",
        )


@pytest.mark.parametrize("evil", ["../evil.png", "/tmp/evil.png", "StableSR_testsets/../../evil.png"])
def test_extraction_refuses_zip_slip_and_leaves_nothing_behind(tmp_path, evil):
    zpath = tmp_path / "cache" / "sets.zip"
    zpath.parent.mkdir()
    zpath.write_bytes(stablesr_zip({evil: b"gotcha"}))
    with pytest.raises(DatasetError, match="unsafe entry"):
        benchsets.extract_once(zpath)
    assert sorted(p.name for p in zpath.parent.iterdir()) == ["sets.zip"]  # no temp dir, no half extraction
    assert not (tmp_path / "evil.png").exists()
    good = tmp_path / "good.zip"
    good.write_bytes(stablesr_zip())
    root = benchsets.extract_once(good)
    assert (root / "StableSR_testsets" / "RealSRVal_crop128" / "test_HR" / "0001.png").is_file()


def test_corrupt_download_is_a_clear_error(tmp_path):
    bad = tmp_path / "sets.zip"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DatasetError, match="not a valid zip.*delete it and retry"):
        benchsets.extract_once(bad)
