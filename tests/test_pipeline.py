"""Upscaler end to end on real photos with a tiny seeded model: sizes, seeds, tiling, colour fixes, PIL modes."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import small_photo, to_tensor
from PIL import Image

from teasr_cli import runtime
from teasr_cli.codecs import PixelUnshuffleCodec
from teasr_cli.degrade import downscale
from teasr_cli.errors import TeasrError
from teasr_cli.folders import load_pretrained
from teasr_cli.pipeline import (
    Upscaler,
    UpscaleSettings,
    adain_color_fix_,
    auto_tile,
    project_to_lr_,
    wavelet_color_fix_,
)
from teasr_cli.sampler import sample


def coarse_corr(out, lq, size=(6, 9)):
    a, b = (F.interpolate(x, size=size, mode="area").flatten().numpy() for x in (out, lq))
    return np.corrcoef(a, b)[0, 1]


@pytest.fixture
def upscaler(make_model):
    return Upscaler(make_model(seed=0), PixelUnshuffleCodec(4), device="cpu", dtype="fp32")  # exact references


@pytest.fixture
def lq(photo):
    return to_tensor(photo.resize((37, 23), Image.Resampling.LANCZOS))  # odd sizes on purpose


def test_output_is_exactly_four_times_and_in_range(upscaler, lq):
    out = upscaler.upscale_tensor(lq, UpscaleSettings(steps=2))
    assert out.shape == (1, 3, 92, 148) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    # even a random model keeps the photo's coarse layout: the wavelet fix ties low frequencies to the input
    assert coarse_corr(out, lq) > 0.75


@pytest.mark.parametrize("hw", [(1, 1), (2, 3), (5, 8)])
def test_tiny_inputs(upscaler, hw):
    assert auto_tile(hw, 2, torch.device("cpu")) >= 4  # never below the smallest valid tile (2 patches)
    out = upscaler.upscale_tensor(torch.rand(1, 3, *hw, generator=torch.Generator().manual_seed(0)))
    assert out.shape == (1, 3, 4 * hw[0], 4 * hw[1])


def test_same_seed_same_image_other_seed_other_image(upscaler, lq):
    a = upscaler.upscale_tensor(lq, UpscaleSettings(steps=2, seed=7))
    b = upscaler.upscale_tensor(lq, UpscaleSettings(steps=2, seed=7))
    c = upscaler.upscale_tensor(lq, UpscaleSettings(steps=2, seed=8))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3


def test_zero_velocity_model_returns_the_seeded_noise_decoded(make_model, lq):
    """A fresh adaLN-Zero model predicts v = 0, so one step leaves the noise as it is: this pins
    the seed contract (a CPU generator, one full-size noise tensor) and the decode path."""
    up = Upscaler(make_model(random=False), PixelUnshuffleCodec(4), device="cpu", dtype="fp32")
    out = up.upscale_tensor(lq, UpscaleSettings(steps=1, seed=3, color_fix="none"))
    noise = torch.randn(1, 48, 23, 37, generator=torch.Generator().manual_seed(3))
    want = (F.pixel_shuffle(noise, 4).clamp(-1, 1) + 1) / 2
    assert torch.equal(out, want)


def reference(model, lq, steps, seed):
    """The pipeline written out by hand, without tiles (DESIGN.md section 5)."""
    x = lq * 2 - 1
    up = F.interpolate(x, scale_factor=4, mode="bicubic", align_corners=False).clamp(-1, 1)
    codec = PixelUnshuffleCodec(4)
    z_lq = codec.encode(up)
    noise = torch.randn(z_lq.shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        out = codec.decode(sample(model, noise, z_lq, steps))
        if steps > 1:  # the LR-grid band from the 1-step result
            project_to_lr_(out, downscale(codec.decode(sample(model, noise, z_lq, 1)), 4), 4)
    out = wavelet_color_fix_(out, x, 4)  # low band from the LQ input itself
    return (out.clamp(-1, 1) + 1) / 2


@pytest.mark.parametrize("tile", [37, 500])
def test_one_tile_at_least_the_image_equals_the_untiled_pipeline(upscaler, lq, tile):
    out = upscaler.upscale_tensor(lq, UpscaleSettings(steps=3, seed=1, tile=tile, grid_shift=False))
    torch.testing.assert_close(out, reference(upscaler.model, lq, 3, 1), atol=1e-6, rtol=0)


def test_grid_shift_moves_the_patch_grid_on_odd_steps_only(upscaler, lq):
    """Step i of N sees the latent padded by half a patch on top/left when i is odd (output cropped back);
    one step is never shifted, and a tile as big as the image still equals the untiled pipeline."""
    p = upscaler.model.config.patch_size
    assert p == 2

    def shifted(z, t_cur, z_lq, t_tar):
        if round((1 - t_cur) * 4) % 2 == 0:
            return upscaler.model(z, t_cur, z_lq, t_tar)
        pad = [F.pad(x, (1, 0, 1, 0), mode="replicate") for x in (z, z_lq)]
        return upscaler.model(pad[0], t_cur, pad[1], t_tar)[..., 1:, 1:]

    out = upscaler.upscale_tensor(lq, UpscaleSettings(steps=4, seed=1, tile=500))
    torch.testing.assert_close(out, reference(shifted, lq, 4, 1), atol=1e-6, rtol=0)
    plain = upscaler.upscale_tensor(lq, UpscaleSettings(steps=4, seed=1, grid_shift=False))
    assert (out - plain).abs().max() > 1e-3
    one = [upscaler.upscale_tensor(lq, UpscaleSettings(steps=1, seed=1, grid_shift=g)) for g in (True, False)]
    assert torch.equal(*one)


def test_real_tiles_stay_close_to_the_untiled_result(upscaler, lq):
    """A global-attention model sees less context in a tile, so tiles are not exact; yet tiling
    (same noise tensor) must change the image far less than another seed does."""
    full = upscaler.upscale_tensor(lq, UpscaleSettings(steps=2, seed=1))
    other_seed = upscaler.upscale_tensor(lq, UpscaleSettings(steps=2, seed=2))
    tiled = upscaler.upscale_tensor(lq, UpscaleSettings(steps=2, seed=1, tile=16, tile_overlap=6, tile_batch=3))
    assert tiled.shape == full.shape
    assert 0 < (tiled - full).abs().mean() < 0.5 * (other_seed - full).abs().mean()


def test_callback_sees_every_model_call(upscaler, lq):
    seen = []
    upscaler.upscale_tensor(lq, UpscaleSettings(steps=3), callback=lambda i, n, z: seen.append((i, n)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]  # the 1-step anchor first
    seen.clear()
    upscaler.upscale_tensor(lq, UpscaleSettings(steps=3, anchor=False), callback=lambda i, n, z: seen.append((i, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


# ------------------------------------------------------------------ consistency with the input: anchor, fidelity


def test_projection_makes_the_downscale_equal_the_input_and_keeps_the_finer_detail():
    hr = to_tensor(small_photo("astronaut", (128, 96))) * 2 - 1
    lr = downscale(hr, 4)
    other = to_tensor(small_photo("coffee", (128, 96))) * 2 - 1  # another photo: everything differs
    out = project_to_lr_(other.clone(), lr, 4)
    assert 20 * torch.log10(2 / (downscale(out, 4) - lr).pow(2).mean().sqrt()) > 45  # PSNR; was ~12 dB
    detail = lambda x: x - F.interpolate(downscale(x, 4), scale_factor=4, mode="bicubic", align_corners=False)
    corr = [np.corrcoef(detail(out).flatten(), detail(x).flatten())[0, 1] for x in (other, hr)]
    assert corr[0] > 0.8 and corr[1] < 0.3  # coffee's fine detail, not the astronaut's
    assert torch.equal(project_to_lr_(hr.clone(), lr, 4), hr)  # consistent: untouched


def test_anchor_gives_n_steps_the_coarse_picture_of_one_step(upscaler, lq):
    one = upscaler.upscale_tensor(lq, UpscaleSettings(steps=1, seed=2, color_fix="none"))
    runs = {
        a: upscaler.upscale_tensor(lq, UpscaleSettings(steps=4, seed=2, color_fix="none", anchor=a))
        for a in (True, False)
    }
    gap = {a: (downscale(r, 4) - downscale(one, 4)).abs().mean() for a, r in runs.items()}
    assert gap[True] < 0.01 < gap[False]
    assert (runs[True] - one).abs().mean() > 0.02  # yet its own detail: not the 1-step image


def test_fidelity_one_is_back_projected_bicubic_whatever_the_model(make_model, lq):
    """F = 1 keeps none of the model's detail: two different models give the same image, which
    downscales back to the input; F = 0 is the plain pipeline."""
    ups = [Upscaler(make_model(seed=s), PixelUnshuffleCodec(4), device="cpu", dtype="fp32") for s in (0, 1)]
    outs = [u.upscale_tensor(lq, UpscaleSettings(steps=2, fidelity=1.0)) for u in ups]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=0)
    bicubic = F.interpolate(lq, scale_factor=4, mode="bicubic", align_corners=False).clamp(0, 1)
    err = lambda x: (downscale(x, 4) - lq).abs().mean()
    assert err(outs[0]) < err(bicubic) / 4
    half = ups[0].upscale_tensor(lq, UpscaleSettings(steps=2, fidelity=0.5))
    plain = ups[0].upscale_tensor(lq, UpscaleSettings(steps=2))
    assert err(half) < err(plain) / 4 and (half - outs[0]).abs().mean() > 1e-3
    assert torch.equal(ups[0].upscale_tensor(lq, UpscaleSettings(steps=2, fidelity=0.0)), plain)


# ------------------------------------------------------------------ colour fixes


def test_wavelet_fix_of_an_image_against_itself_is_identity(photo):
    x = to_tensor(photo) * 2 - 1
    assert torch.equal(wavelet_color_fix_(x.clone(), x, 1), x)
    big = F.interpolate(x, scale_factor=4, mode="nearest")  # its own area-downscale is x again
    torch.testing.assert_close(wavelet_color_fix_(big.clone(), x, 4), big, atol=1e-6, rtol=0)


def test_wavelet_fix_takes_colour_from_the_input_and_detail_from_the_output():
    """The output is a detailed photo with a colour cast; the LQ input is its downscale without the
    cast. The fix must remove exactly the cast and leave every detail of the output in place."""
    hr = to_tensor(small_photo("astronaut", (96, 80))) * 2 - 1
    lq = F.avg_pool2d(hr, 4)
    cast = torch.tensor([0.3, -0.2, 0.1]).view(1, 3, 1, 1)
    fixed = wavelet_color_fix_(hr + cast, lq, 4)
    torch.testing.assert_close(fixed, hr, atol=1e-5, rtol=0)
    # a slowly varying cast (a gradient across the image) is removed too, up to the blur's reach
    ramp = torch.linspace(-0.3, 0.3, hr.shape[-1]).view(1, 1, 1, -1)
    fixed = wavelet_color_fix_(hr + ramp, lq, 4)
    assert (fixed - hr)[..., 16:-16].abs().max() < 0.02 < ramp.abs().max()


def test_adain_matches_channel_mean_and_std(photo):
    out = to_tensor(photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT)) * 0.5 - 0.1
    ref = to_tensor(photo.rotate(90, expand=True)) * 2 - 1  # other size, same channels
    fixed = adain_color_fix_(out.clone(), ref)
    torch.testing.assert_close(fixed.mean((2, 3)), ref.mean((2, 3)), atol=1e-5, rtol=0)
    torch.testing.assert_close(fixed.std((2, 3)), ref.std((2, 3)), atol=1e-4, rtol=0)
    # an affine map per channel: the picture itself is unchanged up to contrast/brightness
    assert np.corrcoef(fixed[0, 0].flatten(), out[0, 0].flatten())[0, 1] > 0.9999


def test_colour_fix_none_and_adain_run_through_the_pipeline(upscaler, lq):
    outs = {c: upscaler.upscale_tensor(lq, UpscaleSettings(color_fix=c)) for c in ("wavelet", "adain", "none")}
    assert all(o.shape == (1, 3, 92, 148) for o in outs.values())
    assert coarse_corr(outs["none"], lq) < 0.5 < coarse_corr(outs["wavelet"], lq)  # a random model alone drifts
    ch_err = {c: (o.mean((2, 3)) - lq.mean((2, 3))).abs().max() for c, o in outs.items()}
    assert ch_err["adain"] < 0.02 and ch_err["wavelet"] < 0.08 < ch_err["none"]


# ------------------------------------------------------------------ errors, loading, PIL


@pytest.mark.parametrize(
    "settings,word",
    [
        (UpscaleSettings(color_fix="sepia"), "colour fix"),
        (UpscaleSettings(steps=0), "steps"),
        (UpscaleSettings(tile=2), "tile"),
        (UpscaleSettings(fidelity=1.5), "fidelity"),
    ],
)
def test_bad_settings_raise_one_line_errors(upscaler, lq, settings, word):
    with pytest.raises(TeasrError, match=word) as info:
        upscaler.upscale_tensor(lq, settings)
    assert "\n" not in str(info.value)


def test_unknown_dtype_is_a_teasr_error(make_model):
    with pytest.raises(TeasrError, match="dtype"):
        Upscaler(make_model(), PixelUnshuffleCodec(4), device="cpu", dtype="fp8")


def test_from_pretrained_folder(tiny_model_dir, lq):
    up = Upscaler.from_pretrained(str(tiny_model_dir), device="cpu", progress=False)
    model, config = load_pretrained(tiny_model_dir)
    assert up.scale == 4 and up.config == config and up.codec.factor == 4
    settings = UpscaleSettings(steps=2, seed=5)
    direct = Upscaler(model, PixelUnshuffleCodec(4), device="cpu").upscale_tensor(lq, settings)
    assert torch.equal(up.upscale_tensor(lq, settings), direct)


def test_bf16_runs_and_stays_near_fp32(make_model, lq):
    fp32 = Upscaler(make_model(), PixelUnshuffleCodec(4), device="cpu", dtype="fp32").upscale_tensor(lq)
    bf16 = Upscaler(make_model(), PixelUnshuffleCodec(4), device="cpu", dtype="bf16").upscale_tensor(lq)
    assert bf16.dtype == torch.float32 and (bf16 - fp32).abs().mean() < 0.02


@pytest.mark.parametrize("amx", [True, False])
def test_auto_dtype_is_bf16_only_on_cpus_that_multiply_it_natively(make_model, monkeypatch, amx):
    import teasr_cli.pipeline as pipeline

    monkeypatch.setattr(pipeline, "cpu_multiplies_bf16", lambda: amx)
    up = Upscaler(make_model(), PixelUnshuffleCodec(4), device="cpu")
    assert up.dtype == (torch.bfloat16 if amx else torch.float32) and up.dtype_name == ("bf16" if amx else "fp32")
    assert next(up.model.parameters()).dtype == up.dtype


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="the kernel's CPU flags are a Linux file")
def test_bf16_detection_agrees_with_the_kernels_cpu_flags():
    """The public torch.cpu.get_capabilities() answer matches what Linux reports for this CPU (AMX tiles)."""
    flags = set(re.findall(r"\w+", Path("/proc/cpuinfo").read_text()))
    assert runtime.cpu_multiplies_bf16() == ("amx_tile" in flags)


def test_pil_rgb_keeps_mode_and_is_four_times(upscaler, photo):
    out = upscaler(photo, steps=1, seed=0)
    assert out.mode == "RGB" and out.size == (4 * photo.width, 4 * photo.height)


def test_pil_rgba_keeps_its_alpha(upscaler, photo):
    alpha = np.zeros((photo.height, photo.width), np.uint8)
    alpha[:, : photo.width // 2] = 255  # left half opaque, right half clear
    rgba = photo.copy()
    rgba.putalpha(Image.fromarray(alpha))
    out = upscaler(rgba)
    assert out.mode == "RGBA" and out.size == (4 * photo.width, 4 * photo.height)
    a = np.asarray(out)[..., 3]
    mid = 2 * photo.width  # the alpha edge, upscaled
    # Lanczos-3 at x4 spreads the edge over +-12 output pixels; beyond that alpha is untouched
    assert (a[:, : mid - 13] == 255).all() and (a[:, mid + 13 :] == 0).all()


def test_pil_grayscale_stays_grayscale(upscaler, photo):
    gray = photo.convert("L")
    out = upscaler(gray)
    assert out.mode == "L" and out.size == (4 * photo.width, 4 * photo.height)
    # the content is the photo's: at a coarse scale it follows the input's brightness layout
    a, b = (np.asarray(x.resize((12, 10), Image.Resampling.BOX), np.float32).ravel() for x in (out, gray))
    assert np.corrcoef(a, b)[0, 1] > 0.7
