"""Real-ESRGAN degradation: kernels, noise, JPEG, the full pipeline, crops."""

import io
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from teasr_cli.degrade import (
    KERNEL_TYPES,
    PRESETS,
    DegradeConfig,
    StageConfig,
    add_gaussian_noise,
    add_poisson_noise,
    bicubic_lq,
    blur_kernel,
    degrade,
    filter2d,
    get_preset,
    jpeg,
    random_crop_flip,
    random_kernel,
    sinc_kernel,
)
from teasr_cli.errors import TeasrError

torch.set_num_threads(1)


def _photo(fn=data.astronaut) -> torch.Tensor:
    return torch.from_numpy(fn().copy()).permute(2, 0, 1).float() / 255


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _psnr(a, b) -> float:
    return (10 * torch.log10(1 / ((a - b) ** 2).mean())).item()


@pytest.fixture(scope="module")
def crops():
    img = _photo()
    return torch.stack([img[:, 0:128, 128:256], img[:, 64:192, 192:320]]).contiguous()


# ----------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("kind", KERNEL_TYPES)
def test_kernels_normalised_and_point_symmetric(kind):
    k = blur_kernel(kind, 21, 2.5, 1.0, theta=0.7, beta=1.7)
    assert k.shape == (21, 21) and k.min() >= 0
    assert k.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert torch.allclose(k, k.flip(0, 1))  # every kernel is symmetric about its centre
    assert k.argmax().item() == 21 * 10 + 10  # and peaks there
    if "aniso" not in kind:  # isotropic kernels equal their transpose
        assert torch.allclose(k, k.T)
    else:  # the anisotropic ones really are not
        assert not torch.allclose(k, k.T, atol=1e-4)


def test_gaussian_matches_separable_reference():
    sx, sy = 1.3, 2.1
    r = torch.arange(15, dtype=torch.float64) - 7
    ref = torch.outer(torch.exp(-(r**2) / (2 * sy**2)), torch.exp(-(r**2) / (2 * sx**2)))
    k = blur_kernel("aniso", 15, sx, sy, theta=0.0)
    assert torch.allclose(k, ref / ref.sum(), atol=1e-12)
    # rotating by 90 degrees swaps the axes; beta = 1 makes the generalized kernel a Gaussian
    assert torch.allclose(blur_kernel("aniso", 15, sx, sy, theta=math.pi / 2), k.T, atol=1e-12)
    assert torch.allclose(blur_kernel("generalized_aniso", 15, sx, sy, beta=1.0), k, atol=1e-12)


def test_plateau_is_flatter_and_heavier_tailed_than_gaussian():
    g, p = blur_kernel("iso", 21, 2.0), blur_kernel("plateau_iso", 21, 2.0, beta=2.0)
    assert p[10, 11] / p[10, 10] > g[10, 11] / g[10, 10]  # flatter top
    assert p[10, 0] / p[10, 10] > g[10, 0] / g[10, 10]  # heavier tail


def test_random_kernels_sum_to_one_and_cover_all_sizes():
    cfg = DegradeConfig()
    g = _gen(0)
    for _ in range(200):  # the mixed Gaussian family, including extreme betas
        k = random_kernel(cfg.stage1, cfg, g)
        assert k.shape == (21, 21) and torch.isfinite(k).all()
        assert k.sum().item() == pytest.approx(1.0, abs=1e-9)
    support = set()  # sinc kernels never vanish at a border, so they show the drawn size
    for _ in range(200):
        k = random_kernel(replace(cfg.stage1, sinc_prob=1.0), cfg, g)
        assert k.sum().item() == pytest.approx(1.0, abs=1e-9)
        nz = (k.abs() > 0).any(0).nonzero()
        support.add(int(nz.max() - nz.min() + 1))
    assert support == {7, 9, 11, 13, 15, 17, 19, 21}


def test_sinc_kernel_is_a_lowpass():
    omega = math.pi / 3
    k = sinc_kernel(omega, 21, pad_to=21)
    assert k.sum().item() == pytest.approx(1.0, abs=1e-12) and torch.allclose(k, k.T)
    spec = torch.fft.fft2(k, s=(128, 128)).abs()
    f = torch.fft.fftfreq(128) * 2 * math.pi  # radians / pixel
    rad = torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    assert spec[0, 0].item() == pytest.approx(1.0, abs=1e-9)
    assert spec[rad < 0.6 * omega].min() > 0.85  # pass band
    assert spec[rad > 1.6 * omega].mean() < 0.1  # stop band
    assert sinc_kernel(omega, 9).shape == (9, 9) and sinc_kernel(omega, 9, pad_to=21).shape == (21, 21)


def test_filter2d_uses_each_images_own_kernel():
    img = _photo()[:, :64, :64]
    k1, k2 = blur_kernel("iso", 21, 3.0), sinc_kernel(math.pi / 2, 21)
    both = filter2d(torch.stack([img, img]), torch.stack([k1, k2]))
    assert torch.allclose(both[0:1], filter2d(img[None], k1[None]), atol=1e-6)
    assert torch.allclose(both[1:2], filter2d(img[None], k2[None]), atol=1e-6)
    flat = torch.full((1, 3, 32, 32), 0.3)  # a normalised kernel keeps flat areas flat
    assert torch.allclose(filter2d(flat, k1[None]), flat, atol=1e-6)


# ----------------------------------------------------------------------------- noise and JPEG


def test_gaussian_noise_statistics_and_gray():
    flat = torch.full((1, 3, 128, 128), 0.5)
    out = add_gaussian_noise(flat, 20.0, gray=False, g=_gen(0))
    assert (out - flat).std().item() == pytest.approx(20 / 255, rel=0.03)
    assert not torch.equal(out[:, 0], out[:, 1])
    gray = add_gaussian_noise(flat, 20.0, gray=True, g=_gen(0))
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])


def test_poisson_noise_is_signal_dependent():
    img = torch.cat([torch.full((1, 3, 64, 128), 0.1), torch.full((1, 3, 64, 128), 0.6)], -1)
    img[..., 0, :] = torch.linspace(0, 1, 256)  # one ramp row: all 256 levels, like a photo
    d = add_poisson_noise(img, 1.0, gray=False, g=_gen(1)) - img
    dark, bright = d[..., 1:, :128], d[..., 1:, 128:]
    assert abs(dark.mean().item()) < 2e-3 and abs(bright.mean().item()) < 2e-3  # unbiased
    # shot noise: std = sqrt(x / 256) for 256 levels, so it grows with the signal
    assert dark.std().item() == pytest.approx(math.sqrt(0.1 / 256), rel=0.05)
    assert bright.std().item() == pytest.approx(math.sqrt(0.6 / 256), rel=0.05)
    gray = add_poisson_noise(img, 1.0, gray=True, g=_gen(1))
    assert torch.equal(gray[:, 0] - img[:, 0], gray[:, 2] - img[:, 2])


def test_jpeg_is_pillows_real_codec():
    img = _photo(data.chelsea)[:, :100, :120]
    arr = (img * 255).round().byte().permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=30)
    ref = torch.from_numpy(np.asarray(Image.open(io.BytesIO(buf.getvalue())), dtype=np.float32) / 255)
    assert torch.equal(jpeg(img, 30), ref.permute(2, 0, 1))


def _blockiness(x: torch.Tensor) -> float:
    """Mean |horizontal step| across 8-pixel block borders over the mean step inside blocks."""
    d = (x[..., :, 1:] - x[..., :, :-1]).abs().mean(dim=(0, 1, 2) if x.ndim == 4 else (0, 1))
    border = torch.arange(d.numel()) % 8 == 7
    return (d[border].mean() / d[~border].mean()).item()


def test_jpeg_creates_8x8_blocks():
    img = _photo(data.coffee)[:, :256, :256]
    assert _blockiness(img) < 1.1
    assert _blockiness(jpeg(img, 10)) > 1.3


# ----------------------------------------------------------------------------- pipeline


def test_deterministic_per_seed(crops):
    cfg = get_preset("realesrgan")
    a, b = degrade(crops, cfg, _gen(7)), degrade(crops, cfg, _gen(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, degrade(crops, cfg, _gen(8)))
    # two copies of one image in a batch get their own parameters
    same = degrade(torch.stack([crops[0], crops[0]]), cfg, _gen(3))
    assert not torch.equal(same[0], same[1])


@pytest.mark.parametrize("h,w", [(32, 32), (64, 48), (96, 128), (44, 60)])
def test_output_size_range_and_8bit(h, w):
    hq = _photo()[:, 100 : 100 + h, 150 : 150 + w][None]
    for seed in range(3):
        lq = degrade(hq, get_preset("realesrgan"), _gen(seed))
        assert lq.shape == (1, 3, h // 4, w // 4)
        assert lq.min() >= 0 and lq.max() <= 1
        assert torch.equal(lq, (lq * 255).round() / 255)  # stored as 8-bit values


def test_realesrgan_degrades_more_than_mild(crops):
    ref = bicubic_lq(crops)
    mean_psnr = {
        name: np.mean([_psnr(degrade(crops, get_preset(name), _gen(s)), ref) for s in range(6)])
        for name in ("realesrgan", "mild")
    }
    assert mean_psnr["realesrgan"] < mean_psnr["mild"] - 1.0
    assert mean_psnr["mild"] < 35  # mild still degrades: far from the bicubic reference


def test_identity_config_reduces_to_two_jpeg_round_trips():
    """With blur, resize, noise and sinc off, scale 1, the pipeline is exactly JPEG(q1) then JPEG(q2)."""
    off = dict(blur_prob=0.0, resize_probs=(0, 0, 1), noise_prob=0.0)
    cfg = DegradeConfig(
        scale=1,
        stage1=StageConfig(jpeg_range=(40, 40), **off),
        stage2=StageConfig(jpeg_range=(75, 75), **off),
        final_sinc_prob=0.0,
    )
    img = _photo(data.chelsea)[:, :64, :96]
    assert torch.equal(degrade(img[None], cfg, _gen(0))[0], jpeg(jpeg(img, 40), 75))


def test_no_nan_over_many_seeds():
    hq = _photo(data.coffee)[:, 100:148, 200:248][None]
    for name in PRESETS:
        for seed in range(25):
            lq = degrade(hq, get_preset(name), _gen(seed))
            assert torch.isfinite(lq).all() and lq.shape == (1, 3, 12, 12)


def test_config_errors_are_teasr_errors():
    with pytest.raises(TeasrError, match="realesrgan, mild"):
        get_preset("nope")
    with pytest.raises(TeasrError, match="divisible"):
        degrade(torch.rand(1, 3, 30, 32), DegradeConfig(), _gen(0))
    with pytest.raises(TeasrError, match="sum to 1"):
        StageConfig(kernel_probs=(0.5, 0.5, 0.5, 0, 0, 0))
    with pytest.raises(TeasrError, match="resize_modes"):
        DegradeConfig(resize_modes=("nearest",))
    # configs from TOML/JSON: nested dicts and lists are accepted
    cfg = DegradeConfig(**{**DegradeConfig().to_dict(), "stage2": {"jpeg_range": [50, 60]}})
    assert cfg.stage2.jpeg_range == (50.0, 60.0) and cfg.stage1 == DegradeConfig().stage1


# ----------------------------------------------------------------------------- crops, bicubic


def test_random_crop_flip():
    img = _photo()
    crop = random_crop_flip(img, 64, _gen(0))
    assert crop.shape == (3, 64, 64) and torch.equal(crop, random_crop_flip(img, 64, _gen(0)))
    # the crop is a window of the image, possibly mirrored: find it
    found = False
    for view in (crop, crop.flip(-1)):
        hits = (img[0] == view[0, 0, 0]).nonzero()
        found |= any(
            torch.equal(img[:, t : t + 64, x : x + 64], view)
            for t, x in hits.tolist()
            if t + 64 <= 512 and x + 64 <= 512
        )
    assert found
    flips = [not torch.equal(random_crop_flip(img[:, :64, :64], 64, _gen(s)), img[:, :64, :64]) for s in range(40)]
    assert 8 < sum(flips) < 32  # about half are mirrored
    views = {
        random_crop_flip(img[:, :64, :64], 64, _gen(s), rotate=True).sum(0)[0, :4].tolist().__str__() for s in range(60)
    }
    assert len(views) == 8  # all dihedral views occur
    with pytest.raises(TeasrError, match="smaller than the crop"):
        random_crop_flip(img[:, :32], 64, _gen(0))


def test_bicubic_lq():
    img = _photo(data.chelsea)[:, :128, :128]
    lq = bicubic_lq(img)
    assert lq.shape == (3, 32, 32) and bicubic_lq(img[None]).shape == (1, 3, 32, 32)
    assert torch.allclose(bicubic_lq(torch.full((1, 3, 64, 64), 0.4)), torch.full((1, 3, 16, 16), 0.4), atol=1e-6)
    # antialiased: the block average of the HQ is much closer than plain subsampling
    box = torch.nn.functional.avg_pool2d(img[None], 4)[0]
    assert _psnr(lq, box) > _psnr(img[:, 1::4, 1::4], box) + 3
