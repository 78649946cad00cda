"""The `teasr` CLI on real photos with a tiny saved model: outputs, refusals, one-line errors, batches."""

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_one_line_error, small_photo, to_tensor
from PIL import Image
from typer.testing import CliRunner

from teasr_cli.batch import RECORD
from teasr_cli.cli import app
from teasr_cli.pipeline import Upscaler, UpscaleSettings

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--device", "cpu", "--threads", "1"]


@pytest.fixture
def cli(tiny_model_dir):
    """cli(*args) -> click Result of `teasr *args` with the tiny model."""
    runner = CliRunner()

    def invoke(*args, model=True):
        extra = ["--model", str(tiny_model_dir), *FAST] if model else []
        return runner.invoke(app, [str(a) for a in args] + extra)

    return invoke


@pytest.fixture
def cat(tmp_path):
    """chelsea (a real photo) at 32x24, as PNG and JPEG."""
    img = small_photo("chelsea", (32, 24))
    img.save(tmp_path / "cat.png")
    img.save(tmp_path / "cat.jpg", quality=90)
    return tmp_path


def snapshot(folder: Path) -> dict:
    """{relative path: (bytes, mtime_ns)} of every file under folder but a batch's settings record."""
    return {
        p.relative_to(folder): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != RECORD
    }


# ------------------------------------------------------------------ upscale


@pytest.mark.parametrize("name", ["cat.png", "cat.jpg"])
def test_upscale_writes_a_four_times_image(cli, cat, name):
    result = cli("upscale", cat / name, "--steps", "2")
    assert result.exit_code == 0, result.output
    out = cat / name.replace("cat.", "cat_x4.")
    assert "wrote" in result.output and str(out) in result.output
    with Image.open(out) as img:
        assert img.size == (128, 96) and img.format == ("PNG" if name.endswith("png") else "JPEG")


def test_upscale_fidelity_makes_the_output_downscale_back_to_the_input(cli, cat):
    from teasr_cli.degrade import downscale

    lq = to_tensor(Image.open(cat / "cat.png"))
    err = {}
    for fid in ("0", "0.5"):
        result = cli("upscale", cat / "cat.png", "--steps", "2", "--fidelity", fid, "-o", cat / f"f{fid}.png")
        assert result.exit_code == 0, result.output
        err[fid] = float((downscale(to_tensor(Image.open(cat / f"f{fid}.png")), 4) - lq).abs().mean())
    assert err["0.5"] < err["0"] / 3, err  # the tiny test model alone drifts far from its input


def test_upscale_output_path_and_format(cli, cat):
    result = cli("upscale", cat / "cat.jpg", "-o", cat / "big.webp")
    assert result.exit_code == 0, result.output
    with Image.open(cat / "big.webp") as img:
        assert img.format == "WEBP" and img.size == (128, 96)
    result = cli("upscale", cat / "cat.jpg", "-f", "png")
    assert result.exit_code == 0 and (cat / "cat_x4.png").is_file(), result.output


def test_upscale_keeps_alpha(cli, tmp_path):
    img = small_photo("coffee", (20, 16)).convert("RGBA")
    img.putalpha(128)
    img.save(tmp_path / "cup.png")
    assert cli("upscale", tmp_path / "cup.png").exit_code == 0
    with Image.open(tmp_path / "cup_x4.png") as out:
        assert out.mode == "RGBA" and out.size == (80, 64) and out.getextrema()[3] == (128, 128)


@pytest.mark.parametrize("spelling", ["same", "dotdot"])
def test_output_equal_to_input_is_refused_and_input_untouched(cli, cat, spelling):
    src = cat / "cat.png"
    before = snapshot(cat)
    dst = src if spelling == "same" else cat / "sub" / ".." / "cat.png"
    assert_one_line_error(cli("upscale", src, "-o", dst), "overwrite the input")
    assert snapshot(cat) == before


def test_existing_output_needs_overwrite(cli, cat):
    (cat / "cat_x4.png").write_bytes(b"keep me")
    assert_one_line_error(cli("upscale", cat / "cat.png"), "exists", "--overwrite")
    assert (cat / "cat_x4.png").read_bytes() == b"keep me"
    assert cli("upscale", cat / "cat.png", "--overwrite").exit_code == 0
    with Image.open(cat / "cat_x4.png") as img:
        assert img.size == (128, 96)


def _truncated_jpeg(folder: Path) -> Path:
    buf = io.BytesIO()
    small_photo("chelsea", (64, 48)).save(buf, "JPEG", quality=90)
    (folder / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return folder / "cut.jpg"


@pytest.mark.parametrize(
    "case,words",
    [
        ("missing", ["no such file"]),
        ("text-as-jpg", ["not an image"]),
        ("truncated", ["corrupt or truncated"]),
        ("empty", ["empty"]),
        ("folder", ["not a file"]),
    ],
)
def test_unreadable_inputs_give_one_line_and_write_nothing(cli, tmp_path, case, words):
    src = {
        "missing": tmp_path / "nope.jpg",
        "text-as-jpg": tmp_path / "notes.jpg",
        "truncated": None,
        "empty": tmp_path / "empty.png",
        "folder": tmp_path / "dir.png",
    }[case]
    if case == "text-as-jpg":
        src.write_text("this is not a photo\n")
    elif case == "truncated":
        src = _truncated_jpeg(tmp_path)
    elif case == "empty":
        src.write_bytes(b"")
    elif case == "folder":
        src.mkdir()
    before = snapshot(tmp_path)
    assert_one_line_error(cli("upscale", src), *words)
    assert snapshot(tmp_path) == before  # no output, no temp file


@pytest.mark.parametrize(
    "args,words",
    [
        (["--model", "no-such-model"], ["unknown model", "no-such-model"]),
        (["--model", "./missing-folder"], ["does not exist"]),
        (["-o", "missing-dir/out.png"], ["does not exist"]),
        (["-o", "out.gif"], ["unknown output suffix"]),
        (["-o", "out.png", "-f", "jpg"], ["another format", "out.jpg"]),
    ],
)
def test_bad_options_give_one_line_errors(cli, cat, tiny_model_dir, args, words, monkeypatch):
    monkeypatch.chdir(cat)
    model = "--model" not in args
    before = snapshot(cat)
    assert_one_line_error(cli("upscale", "cat.png", *args, *([] if model else FAST), model=model), *words)
    assert snapshot(cat) == before


def test_help_shows_examples(cli):
    for cmd in ("upscale", "batch"):
        result = cli(cmd, "--help", model=False)
        assert result.exit_code == 0 and "Examples" in result.output and f"teasr {cmd}" in result.output


def test_models_lists_the_default(cli):
    result = cli("models", model=False)
    assert result.exit_code == 0 and "teasr-hybrid" in result.output


# ------------------------------------------------------------------ batch


@pytest.fixture
def album(tmp_path):
    """photos/ with a.png, b.jpg, notes.txt, bad.png (corrupt) and sub/c.png: real photos, small."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    small_photo("chelsea", (24, 16)).save(root / "a.png")
    small_photo("coffee", (20, 16)).save(root / "b.jpg", quality=90)
    small_photo("astronaut", (16, 16)).save(root / "sub" / "c.png")
    (root / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (root / "notes.txt").write_text("not an image")
    return root


def test_batch_recursive_keeps_tree_reports_corrupt_file_and_resumes(cli, album, tmp_path):
    out = tmp_path / "out"
    result = cli("batch", album, "-o", out, "-r")
    assert result.exit_code == 1, result.output
    assert "bad.png" in result.output and "Traceback" not in result.output
    files = snapshot(out)
    assert sorted(map(str, files)) == ["a.png", "b.jpg", "sub/c.png"]  # no temp files, nothing for bad.png
    for rel, size in [("a.png", (96, 64)), ("b.jpg", (80, 64)), ("sub/c.png", (64, 64))]:
        with Image.open(out / rel) as img:
            assert img.size == size
    again = cli("batch", album, "-o", out, "-r")
    assert again.exit_code == 1 and "bad.png" in again.output
    assert snapshot(out) == files  # finished outputs skipped: same bytes, same mtimes
    assert "skipped" in again.output


def test_batch_shards_files_across_processes(cli, album, tmp_path, monkeypatch):
    """Under accelerate/torchrun (RANK, WORLD_SIZE) each process takes its own share; none is done twice."""
    out = tmp_path / "out"
    done = []
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        before = set(snapshot(out)) if out.exists() else set()
        result = cli("batch", album, "-o", out, "-r", "--glob", "[abc].*")
        assert result.exit_code == 0, result.output
        assert f"process {rank + 1}/2" in result.output
        done.append(set(snapshot(out)) - before)
    assert done[0] and done[1] and not done[0] & done[1]
    assert sorted(map(str, done[0] | done[1])) == ["a.png", "b.jpg", "sub/c.png"]


def test_batch_glob_and_non_recursive(cli, album, tmp_path):
    result = cli("batch", album, "-o", tmp_path / "jpg", "-r", "--glob", "*.jpg")
    assert result.exit_code == 0, result.output
    assert sorted(map(str, snapshot(tmp_path / "jpg"))) == ["b.jpg"]
    result = cli("batch", album, "-o", tmp_path / "png", "--glob", "*.png")
    assert result.exit_code == 1 and "bad.png" in result.output
    assert sorted(map(str, snapshot(tmp_path / "png"))) == ["a.png"]  # no -r: sub/ left alone


def test_batch_default_output_folder_and_format(cli, album):
    result = cli("batch", album, "-r", "-f", "png", "--glob", "[abc].*")
    assert result.exit_code == 0, result.output
    assert sorted(map(str, snapshot(album.with_name("photos_x4")))) == ["a.png", "b.png", "sub/c.png"]


@pytest.mark.parametrize(
    "case,words",
    [
        ("missing", ["no such folder"]),
        ("same", ["input folder"]),
        ("nothing", ["no images matching"]),
    ],
)
def test_batch_refusals(cli, album, tmp_path, case, words):
    args = {"missing": [tmp_path / "nope"], "same": [album, "-o", album], "nothing": [album, "--glob", "*.gif"]}[case]
    before = snapshot(tmp_path)
    assert_one_line_error(cli("batch", *args), *words)
    assert {p for p in snapshot(tmp_path) if "photos_x4" not in str(p)} == set(before)


# ------------------------------------------------------------------ a real process


def _teasr(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "80"}
    return subprocess.run(
        [sys.executable, "-m", "teasr_cli", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_real_process_upscales_and_fails_cleanly(cat, tiny_model_dir):
    ok = _teasr("upscale", "cat.jpg", "-o", "big.png", "--model", tiny_model_dir, *FAST, cwd=cat)
    assert ok.returncode == 0, ok.stderr
    with Image.open(cat / "big.png") as img:
        assert img.size == (128, 96)
    _truncated_jpeg(cat)
    bad = _teasr("upscale", "cut.jpg", "--model", tiny_model_dir, *FAST, cwd=cat)
    err = bad.stderr.strip()
    assert bad.returncode == 2 and bad.stdout == ""
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("error:"), err
    assert not (cat / "cut_x4.jpg").exists()


def test_upscale_without_model_uses_the_shipped_weights_and_beats_bicubic(tmp_path):
    """The embedded default (teasr_cli/weights, at most 30 MB) in a real process with no --model: on a real photo
    downscaled by bicubic, its 1-step x4 is closer to the original than bicubic upscaling, by LPIPS."""
    import torch

    from teasr_cli.hub import EMBEDDED_DIR
    from teasr_cli.metrics import LPIPS

    assert (EMBEDDED_DIR / "model.safetensors").stat().st_size <= 30e6
    hr = small_photo("chelsea", (192, 128))
    hr.resize((48, 32), Image.Resampling.BICUBIC).save(tmp_path / "lr.png")
    ok = _teasr("upscale", "lr.png", *FAST, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    with Image.open(tmp_path / "lr_x4.png") as img:
        sr = img.convert("RGB")
    bic = Image.open(tmp_path / "lr.png").resize(hr.size, Image.Resampling.BICUBIC)
    with torch.no_grad():
        lpips = LPIPS(net="alex").eval()
        ours, base = (lpips(to_tensor(x), to_tensor(hr)).item() for x in (sr, bic))
    assert ours < base - 0.05, (ours, base)  # measured 0.23 vs 0.38


def test_shipped_weights_with_fidelity_keep_a_clean_input_within_a_db_of_bicubic():
    """--fidelity 0.5 on a clean (PIL-bicubic, not quite the projection's kernel) downscale of a real photo:
    PSNR-Y no worse than bicubic's by more than 0.5 dB (the blind default loses 2.4), LPIPS still far below."""
    import torch

    from teasr_cli.metrics import LPIPS, psnr_y
    from teasr_cli.pipeline import Upscaler, UpscaleSettings

    hr = small_photo("chelsea", (192, 128))
    lr = hr.resize((48, 32), Image.Resampling.BICUBIC)
    up = Upscaler.from_pretrained(None, device="cpu", progress=False)
    hr, bic = to_tensor(hr), to_tensor(lr.resize(hr.size, Image.Resampling.BICUBIC))
    with torch.no_grad():
        lpips = LPIPS(net="alex").eval()
        blind, fid = (up.upscale_tensor(to_tensor(lr), UpscaleSettings(fidelity=f)) for f in (0.0, 0.5))
        psnr = {k: psnr_y(x, hr).item() for k, x in (("bic", bic), ("blind", blind), ("fid", fid))}
        assert psnr["fid"] > psnr["bic"] - 0.5 and psnr["fid"] > psnr["blind"] + 1, psnr  # measured 29.1 / 28.7 / 26.3
        assert lpips(fid, hr).item() < lpips(bic, hr).item() - 0.1  # measured 0.23 vs 0.38


# ------------------------------------------------------------------ conventions (issue 22)


def test_version_short_help_and_choices_in_help(cli):
    from teasr_cli import __version__

    for flag in ("--version", "-V"):
        result = cli(flag, model=False)
        assert result.exit_code == 0 and result.output.strip() == f"teasr {__version__}"
    assert cli("-h", model=False).exit_code == 0
    text = CliRunner().invoke(app, ["upscale", "-h"], env={"COLUMNS": "240", "TERMINAL_WIDTH": "240"}).output
    for choices in (
        "wavelet|adain|none",
        "auto|fp32|bf16|fp16",
        "none|model|sequential",
        "png|jpg|jpeg|webp",
        "auto|cpu|cuda|cuda:N|mps",
        "org/name[@revision]",
    ):
        assert choices in text, choices
    bad = cli("upscale", "x.png", "--color-fix", "sepia")
    assert bad.exit_code == 2 and "'sepia' is not one of" in " ".join(bad.output.split())


def test_shell_completion_completes_commands(tmp_path):
    teasr = Path(sys.executable).with_name("teasr")
    script = subprocess.run([teasr, "--show-completion", "bash"], capture_output=True, text=True, timeout=60)
    assert script.returncode == 0 and "_TEASR_COMPLETE" in script.stdout, script.stdout + script.stderr
    env = {**os.environ, "_TEASR_COMPLETE": "complete_bash", "COMP_WORDS": "teasr up", "COMP_CWORD": "1"}
    done = subprocess.run([teasr], env=env, capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["upscale"], done.stdout + done.stderr


@pytest.mark.parametrize(
    "args,name,size",
    [
        (["-s", "2"], "cat_x2.png", (64, 48)),
        (["--scale", "3.5", "--suffix", "-big"], "cat-big.png", (112, 84)),
        (["-s", "0.5", "-f", "jpg"], "cat_x0.5.jpg", (16, 12)),
    ],
)
def test_scale_gives_exactly_that_size_and_the_summary_line(cli, cat, args, name, size):
    result = cli("upscale", cat / "cat.png", *args)
    assert result.exit_code == 0, result.output
    assert re.fullmatch(rf"wrote {re.escape(str(cat / name))} \({size[0]}x{size[1]}\) in \d+ s", result.output.strip())
    with Image.open(cat / name) as img:
        assert img.size == size


def test_out_png_with_format_jpg_is_refused_before_any_work(cli, cat):
    before = snapshot(cat)
    assert_one_line_error(cli("upscale", cat / "cat.png", "-o", cat / "out.png", "-f", "jpg"), "out.jpg")
    assert snapshot(cat) == before
    assert cli("upscale", cat / "cat.png", "-o", cat / "out.jpeg", "-f", "jpg").exit_code == 0


def test_fp16_on_a_cpu_is_refused_and_bf16_without_amx_warns(cli, cat, monkeypatch):
    assert_one_line_error(cli("upscale", cat / "cat.png", "--dtype", "fp16"), "fp16 is for GPUs")
    assert not (cat / "cat_x4.png").exists()
    import teasr_cli.runtime

    monkeypatch.setattr(teasr_cli.runtime, "cpu_multiplies_bf16", lambda: False)
    result = cli("upscale", cat / "cat.png", "--dtype", "bf16")
    assert result.exit_code == 0 and "warning:" in result.output and "no AMX" in result.output, result.output


def test_batch_rerun_with_other_settings_warns_and_keeps_then_overwrite_redoes(cli, album, tmp_path):
    out = tmp_path / "out"
    args = ["batch", album, "-o", out, "--glob", "[ab].*"]
    assert cli(*args).exit_code == 0
    made = snapshot(out)
    resumed = cli(*args)
    assert resumed.exit_code == 0 and "warning" not in resumed.output and snapshot(out) == made
    assert "0/0" not in resumed.output and "eta" not in resumed.output  # nothing to do: no empty bar
    other = cli(*args, "--steps", "2")
    text = " ".join(other.output.split())
    assert other.exit_code == 0 and "warning: 2 output(s)" in text and "steps 1 -> 2" in text, other.output
    assert re.search(r"kept \(other settings\)\s*│\s*2 ", other.output) and snapshot(out) == made
    redo = cli(*args, "--steps", "2", "--overwrite")
    assert redo.exit_code == 0 and re.search(r"upscaled\s*│\s*2 ", redo.output), redo.output
    assert snapshot(out).keys() == made.keys() and snapshot(out) != made
    assert "warning" not in cli(*args, "--steps", "2").output  # the record now says steps 2


def test_batch_glob_ignores_the_case_of_extensions(cli, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    small_photo("coffee", (16, 12)).save(src / "UPPER.PNG")
    small_photo("chelsea", (16, 12)).save(src / "lower.png")
    result = cli("batch", src, "-o", tmp_path / "out", "--glob", "*.png", "-s", "2", "--suffix", "_x2")
    assert result.exit_code == 0, result.output
    assert sorted(map(str, snapshot(tmp_path / "out"))) == ["UPPER_x2.PNG", "lower_x2.png"]
    with Image.open(tmp_path / "out" / "UPPER_x2.PNG") as img:
        assert img.size == (32, 24)


def test_ctrl_c_in_a_terminal_says_interrupted_exits_130_and_leaves_nothing(tmp_path, tiny_model_dir):
    """A real process in a pseudo-terminal: the bar shows tiles x passes with an ETA; SIGINT once it moves."""
    import pty
    import select
    import signal as sig

    small_photo("astronaut", (192, 160)).save(tmp_path / "a.png")
    before = snapshot(tmp_path)
    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "100", "TERM": "xterm"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "teasr_cli",
            "upscale",
            "a.png",
            "--model",
            tiny_model_dir,
            "--steps",
            "8",
            "--tile",
            "8",
            *FAST,
        ],
        cwd=tmp_path,
        env=env,
        stdin=slave,
        stdout=slave,
        stderr=slave,
    )
    os.close(slave)
    seen, sent, ansi = b"", False, re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 60)
            if not ready:
                break
            try:
                chunk = os.read(master, 4096)
            except OSError:  # the process has ended
                break
            if not chunk:
                break
            seen += ansi.sub(b"", chunk)
            if not sent and re.search(rb"upscaling a\.png.* [1-9]\d*/\d+ .*eta \d", seen):
                proc.send_signal(sig.SIGINT)
                sent = True
    finally:
        os.close(master)
    text = seen.decode(errors="replace")
    assert proc.wait(timeout=60) == 130 and sent, text
    assert "interrupted" in text and "Traceback" not in text, text
    totals = {int(n) for n in re.findall(r" \d+/(\d+) ", text)}
    up = Upscaler.from_pretrained(tiny_model_dir, device="cpu", progress=False)
    assert totals == {up.work(160, 192, UpscaleSettings(steps=8, tile=8))}, text  # 9 passes (anchor) x tiles
    assert snapshot(tmp_path) == before  # no output, no temp file


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real one-step training run (tiny model, three small real photos), to export, made with the README's
    multi-process form `accelerate launch -m teasr_cli train ...` (one process here, no accelerate config)."""
    root = tmp_path_factory.mktemp("train")
    for name in ("astronaut", "chelsea", "coffee"):
        small_photo(name, (64, 48)).save(root / f"{name}.png")
    recipe = root / "tiny.toml"
    recipe.write_text(
        "model = { patch_size = 2, hidden_size = 32, depth = 1, num_heads = 2 }\n"
        'degradation = "bicubic"\nlpips = ""\nsample_every = 0\nlog_every = 1\nckpt_every = 1\n'
        "batch_size = 1\n[stages.prior]\nlr = 1e-3\n"
    )
    run = root / "run"
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HOME": str(root / "hf")}  # no user accelerate config
    result = subprocess.run(
        [
            accelerate,
            "launch",
            "-m",
            "teasr_cli",
            "train",
            "-c",
            recipe,
            "--data",
            root,
            "--out",
            run,
            "--steps",
            "1",
            "--crop",
            "32",
            "--threads",
            "1",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "done: model in" in result.stderr, result.stderr
    assert (run / "ckpt-0000001").is_dir()
    return run


def test_export_refuses_to_replace_a_folder_without_overwrite(cli, run_dir, tmp_path):
    dst = tmp_path / "model"
    ok = cli("export", run_dir, "-o", dst, model=False)
    assert ok.exit_code == 0 and "fp32 weights" in ok.output and "--half" in ok.output, ok.output
    weights = (dst / "model.safetensors").read_bytes()
    card = (dst / "README.md").read_text()
    front = card.split("---\n")[1]  # the Hub's metadata header
    assert 'license: "apache-2.0"' in front and 'library_name: "teasr"' in front and '"super-resolution"' in front
    assert '"crop": 32' in card and "stage `prior`" in card and "fp32 weights" in card
    assert_one_line_error(cli("export", run_dir, "-o", dst, "--half", model=False), "exists", "--overwrite")
    alias = cli("train", "--export", run_dir, "-o", dst, "--half", model=False)
    assert alias.exit_code == 2 and "teasr export" in alias.output and "--overwrite" in alias.output
    assert (dst / "model.safetensors").read_bytes() == weights
    half = cli("train", "--export", run_dir, "-o", dst, "--half", "--overwrite", model=False)
    assert half.exit_code == 0 and "fp16 weights" in half.output, half.output
    assert (dst / "model.safetensors").stat().st_size < len(weights) * 0.6
    assert "fp16 weights" in (dst / "README.md").read_text()


def test_fid_is_in_the_default_metrics_only_from_a_few_hundred_images():
    from teasr_cli import evaluation as ev

    assert ev.default_metrics(2) == ["psnr", "ssim", "lpips", "dists", "niqe"]
    assert ev.default_metrics(ev.FID_MIN_IMAGES - 1)[-1] != "fid" and ev.default_metrics(ev.FID_MIN_IMAGES)[-1] == "fid"


def test_model_card_names_the_hub_base_model_only_when_there_is_one():
    from teasr_cli.card import model_card

    assert 'base_model: "Qwen/Qwen-Image-2512"' in model_card(
        "m", {"backbone": "qwen-image", "base": "Qwen/Qwen-Image-2512@abc"}
    )
    assert 'base_model: "org/prior"' in model_card("m", {"backbone": "native", "init": "org/prior@v1"})
    assert "base_model" not in model_card("m", {"backbone": "native", "init": None})


def test_push_uploads_an_exported_folder_that_then_loads_from_the_hub(cli, run_dir, tmp_path, monkeypatch):
    from hubserver import point_hub_at, serve_hub

    from teasr_cli.hub import MODEL_FILES

    dst = tmp_path / "model"
    assert cli("export", run_dir, "-o", dst, "--half", model=False).exit_code == 0
    (dst / "notes.txt").write_text("not part of a model")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    with serve_hub({}) as (endpoint, hub):
        point_hub_at(monkeypatch, endpoint, tmp_path / "hf-cache")
        pushed = cli("push", dst, "org/new", model=False)
        assert pushed.exit_code == 0 and f"{endpoint}/org/new/commit/" in pushed.output, pushed.output
        sha = hub.commit("org/new")
        assert set(hub.commits["org/new"][sha]) == {".gitattributes", *MODEL_FILES, "README.md"}  # no notes.txt
        up = Upscaler.from_pretrained("org/new", device="cpu", progress=False)
        assert up.folder.name == sha
        for name in (*MODEL_FILES, "README.md"):
            assert (up.folder / name).read_bytes() == (dst / name).read_bytes(), name
        (dst / "README.md").write_text((dst / "README.md").read_text() + "\nMore words.\n")
        assert cli("push", dst, "org/new", "-m", "card", model=False).exit_code == 0  # the repo exists: a commit
        assert hub.commit("org/new") != sha and hub.commits["org/new"][hub.commit("org/new")]["README.md"].endswith(
            b"More words.\n"
        )
        assert_one_line_error(cli("push", tmp_path, "org/new", model=False), "has no config.json")
        assert_one_line_error(cli("push", dst, "not a repo", model=False), "malformed Hub repo id")


def test_prepare_photos_takes_any_folder_of_photos(tmp_path):
    """train/prepare_photos.py --from DIR: no apt; JPEGs halved (their artefacts are not HQ), every N-th held out."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    small_photo("astronaut", (1200, 1100)).save(src / "sub" / "big.JPG", quality=95)
    small_photo("chelsea", (300, 200)).save(src / "cat.png")
    small_photo("coffee", (600, 560)).save(src / "cup.png")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [
            sys.executable,
            ROOT / "train" / "prepare_photos.py",
            "--from",
            src,
            "--out",
            tmp_path / "out",
            "--val-every",
            "3",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    files = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.png"))
    assert files == [
        "train/cat.png",
        "train/cup.png",
        "val/sub_big.png",
        "val_hr/sub_big_0.png",
        "val_hr/sub_big_1.png",
    ]
    assert Image.open(tmp_path / "out" / "val" / "sub_big.png").size == (600, 550)
    assert Image.open(tmp_path / "out" / "train" / "cup.png").size == (600, 560)


def test_cli_choices_agree_with_the_library():
    from teasr_cli import cli as c
    from teasr_cli.backbones.qwen_image import OFFLOAD_MODES
    from teasr_cli.imageio import SUFFIX_FORMATS
    from teasr_cli.pipeline import COLOR_FIXES, DTYPES

    values = {
        name: [m.value for m in enum]
        for name, enum in (("color", c.ColorFix), ("dtype", c.DType), ("offload", c.Offload), ("format", c.ImageFormat))
    }
    assert values["color"] == list(COLOR_FIXES) and values["dtype"] == ["auto", *DTYPES]
    assert values["offload"] == list(OFFLOAD_MODES)
    assert sorted("." + f for f in values["format"]) == sorted(SUFFIX_FORMATS)
