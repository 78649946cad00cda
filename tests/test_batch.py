"""teasr_cli.batch (planning, resume records, output scale) and the pipeline's progress total, on real photos."""

from pathlib import PurePosixPath

import numpy as np
import pytest
import torch
from conftest import small_photo, to_tensor
from PIL import Image

from teasr_cli import batch
from teasr_cli.errors import ImageWriteError, TeasrError
from teasr_cli.imageio import from_pil, read_image, to_pil
from teasr_cli.pipeline import Upscaler, UpscaleSettings

# ------------------------------------------------------------------ progress: tiles x passes, known up front


@pytest.fixture(scope="module")
def up(tiny_model_dir):
    return Upscaler.from_pretrained(tiny_model_dir, device="cpu", progress=False)


@pytest.mark.parametrize(
    "kw",
    [
        dict(steps=1),
        dict(steps=3),  # + the 1-step anchor pass
        dict(steps=3, anchor=False),
        dict(steps=2, fidelity=0.5),  # the fidelity projection replaces the anchor: no extra pass
        dict(steps=2, tile=8, tile_overlap=2),
        dict(steps=1, tile=6, tile_batch=3),  # several tiles per model call
    ],
)
def test_work_is_the_total_the_tile_callback_counts_to_from_its_first_call(up, kw):
    lq = to_tensor(small_photo("chelsea", (20, 13)))  # odd size: padded to the codec's grid
    s = UpscaleSettings(**kw)
    total = up.work(*lq.shape[-2:], s)
    seen = []
    up.upscale_tensor(lq, s, tile_callback=lambda done, n: seen.append((done, n)))
    assert {n for _, n in seen} == {total}  # the same total from the very first call
    assert seen[-1][0] == total and all(a < b for (a, _), (b, _) in zip(seen, seen[1:]))
    passes = kw["steps"] + (kw["steps"] > 1 and kw.get("anchor", True) and not kw.get("fidelity"))
    assert total % passes == 0 and (total > passes) == ("tile" in kw)


# ------------------------------------------------------------------ listing and planning


def test_glob_matches_image_suffixes_in_any_case():
    assert batch.matches(PurePosixPath("UPPER.PNG"), "*.png")
    assert batch.matches(PurePosixPath("lower.png"), "*.PNG")
    assert batch.matches(PurePosixPath("sub/x.JPG"), "*.jpg")
    assert not batch.matches(PurePosixPath("a.png"), "*.jpg")
    assert not batch.matches(PurePosixPath("Photo.png"), "photo*")  # only the suffix is case-insensitive


@pytest.fixture
def album(tmp_path):
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    for name, photo in [("b.jpg", "coffee"), ("A.PNG", "chelsea"), ("sub/c.png", "astronaut")]:
        small_photo(photo, (12, 8)).save(root / name)
    (root / "notes.txt").write_text("not an image")
    return root


def test_plan_lists_sorted_names_outputs_and_shards(album, tmp_path):
    out = tmp_path / "out"
    p = batch.plan(album, out, {"steps": 1}, "*.png", recursive=True, fmt="webp", suffix="_x4")
    assert [(s.relative_to(album).as_posix(), d.relative_to(out).as_posix()) for s, d in p.todo] == [
        ("A.PNG", "A_x4.webp"),
        ("sub/c.png", "sub/c_x4.webp"),
    ]
    shares = [batch.plan(album, out, {}, recursive=True, rank=r, world=2).jobs for r in (0, 1)]
    assert sorted(shares[0] + shares[1]) == batch.plan(album, out, {}, recursive=True).jobs
    assert not set(shares[0]) & set(shares[1])
    with pytest.raises(TeasrError, match="no images matching"):
        batch.plan(album, out, {}, "*.gif")


def test_plan_refuses_two_inputs_that_would_write_one_output(album, tmp_path):
    small_photo("coffee", (12, 8)).save(album / "b.png")
    with pytest.raises(TeasrError, match="both be written"):
        batch.plan(album, tmp_path / "out", {}, fmt="png")


def test_plan_tells_a_resume_from_a_rerun_with_other_settings(album, tmp_path):
    out = tmp_path / "out"
    first = batch.plan(album, out, {"steps": 1})
    out.mkdir()
    (src, dst), (src2, dst2) = first.todo
    dst.write_bytes(b"made with steps 1")
    batch.record(out, dst, {"steps": 1})
    dst2.write_bytes(b"made before records existed")
    same = batch.plan(album, out, {"steps": 1})
    assert same.todo == [] and same.done == [(src, dst), (src2, dst2)] and same.stale == []
    other = batch.plan(album, out, {"steps": 4})
    assert other.stale == [(src, dst, {"steps": 1})] and other.done == [(src2, dst2)] and other.todo == []
    assert batch.differences({"steps": 1}, {"steps": 4}) == "steps 1 -> 4"
    assert batch.plan(album, out, {"steps": 4}, overwrite=True).todo == first.todo


def test_records_last_line_wins_and_a_torn_line_is_skipped(tmp_path):
    batch.record(tmp_path, tmp_path / "a.png", {"steps": 1})
    batch.record(tmp_path, tmp_path / "a.png", {"steps": 2})
    with open(tmp_path / batch.RECORD, "a") as f:
        f.write('{"output": "b.png", "sett')  # killed mid-append
    assert batch.read_records(tmp_path) == {"a.png": {"steps": 2}}


def test_output_suffix_must_agree_with_the_format(tmp_path):
    batch.check_output(tmp_path / "out.jpg", "jpeg")
    batch.check_output(tmp_path / "out.png", None)
    with pytest.raises(ImageWriteError, match="out.jpg"):
        batch.check_output(tmp_path / "out.png", "jpg")
    assert batch.suffix_for("jpeg", ".png") == ".jpg" and batch.suffix_for(None, ".PNG") == ".PNG"


# ------------------------------------------------------------------ output scale


@pytest.mark.parametrize("scale,size", [(2, (48, 64)), (3.5, (84, 112)), (0.5, (12, 16)), (1 / 3, (8, 11))])
def test_output_size_is_the_input_times_the_scale(scale, size):
    assert batch.output_size((24, 32), scale) == size


def test_resize_is_exact_and_antialiased_lanczos_on_float_pixels():
    """Sizes are exact, alpha follows, and the pixels are Pillow's Lanczos (antialiased when shrinking), computed
    on floats: a photo taken x4 and back comes back above 30 dB (measured 34.5 on this 40x32 crop)."""
    img = small_photo("astronaut", (40, 32)).convert("RGBA")
    img.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (32, 1))))
    pic = from_pil(img)
    big = batch.resize(pic, (128, 160))
    assert big.size == (128, 160) and big.alpha.shape[-2:] == (128, 160)
    back = batch.resize(big, (32, 40))
    mse = float(((back.rgb - pic.rgb) ** 2).mean())
    assert 10 * np.log10(1 / mse) > 30, mse
    ref = np.asarray(to_pil(big).convert("RGB").resize((40, 32), Image.Resampling.LANCZOS), dtype=np.float32) / 255
    assert np.abs(back.rgb.permute(1, 2, 0).numpy() - ref).mean() < 1 / 255  # Pillow's own filter, on 8 bits
    assert batch.resize(pic, pic.size) is pic


def test_upscale_file_with_a_scale_writes_exactly_that_size(up, tmp_path):
    small_photo("chelsea", (30, 20)).save(tmp_path / "cat.png")
    sizes = []
    out = batch.upscale_file(
        up,
        tmp_path / "cat.png",
        tmp_path / "x2.jpg",
        UpscaleSettings(),
        scale=2,
        fmt=None,
        on_read=lambda pic: sizes.append(pic.size),
    )
    assert sizes == [(20, 30)] and out.size == (40, 60) and read_image(tmp_path / "x2.jpg").size == (40, 60)
    x4 = batch.upscale_file(up, tmp_path / "cat.png", tmp_path / "x4.png", UpscaleSettings(), scale=4)
    direct = up.upscale_tensor(read_image(tmp_path / "cat.png").rgb[None], UpscaleSettings())[0]
    assert torch.equal(x4.rgb, direct.clamp(0, 1))  # scale 4 is the model's own result, untouched
