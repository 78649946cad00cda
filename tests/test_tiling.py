"""Tiled velocity: tile grid, blend weights, and tiles vs the whole latent on a real photo."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data as skdata

from teasr_cli.codecs import PixelUnshuffleCodec
from teasr_cli.tiling import TiledVelocity, tile_starts

C = 48


class LocalModel:
    """v = conv(cat(z, z_lq)) + t-dependent bias: a pure function of a (k x k) neighbourhood.

    Zero padding, like a tile border: a tile's output is exact except within k//2 pixels of a
    tile edge that is not an image edge.
    """

    def __init__(self, k: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.weight = torch.randn(C, 2 * C, k, k, generator=g) / (2 * C * k * k) ** 0.5
        self.k = k
        self.calls = []

    def __call__(self, z, t_cur, z_lq, t_tar):
        self.calls.append(tuple(z.shape))
        v = F.conv2d(torch.cat([z, z_lq], 1), self.weight, padding=self.k // 2)
        return v + t_cur - 0.5 * t_tar


def photo_latents(size=96, seed=0):
    """z_lq of a real photo (astronaut, bicubic-free: area-downscaled) and a noise latent."""
    img = torch.from_numpy(np.ascontiguousarray(skdata.astronaut())).permute(2, 0, 1)[None].float() / 255
    img = F.interpolate(img, size=(size, size + 24), mode="area") * 2 - 1
    z_lq = PixelUnshuffleCodec(4).encode(img)
    noise = torch.randn(z_lq.shape, generator=torch.Generator().manual_seed(seed))
    return noise, z_lq


# ------------------------------------------------------------------ the grid


def test_tile_starts_cover_the_range_with_at_least_the_overlap():
    for size in range(1, 60):
        for tile in range(2, 24):
            for overlap in range(0, tile):
                s = tile_starts(size, tile, overlap)
                if tile >= size:
                    assert s == [0]
                    continue
                assert s[0] == 0 and s[-1] + tile == size, (size, tile, overlap, s)
                assert all(b > a for a, b in zip(s, s[1:])), (size, tile, overlap, s)
                assert all(a + tile - b >= overlap for a, b in zip(s, s[1:])), (size, tile, overlap, s)


@pytest.mark.parametrize("H,W", [(13, 9), (32, 32), (37, 20), (64, 17), (24, 30)])
@pytest.mark.parametrize("tile,overlap", [(8, 0), (8, 2), (8, 7), (12, 4), (16, 3), (16, 8), (40, 4)])
def test_blend_weights_sum_to_one_everywhere(H, W, tile, overlap):
    tv = TiledVelocity(None, tile, overlap)
    tiles, norm = tv.grid(H, W)
    total = torch.zeros(H, W, dtype=torch.float64)
    for (y, x, h, w), wt in zip(tiles, norm):
        assert wt.shape == (h, w) and y + h <= H and x + w <= W
        assert (wt >= 0).all() and (wt <= 1 + 1e-6).all()
        total[y : y + h, x : x + w] += wt
    torch.testing.assert_close(total, torch.ones_like(total), atol=1e-6, rtol=0)
    assert len(tiles) == len(tile_starts(H, min(tile, H), overlap)) * len(tile_starts(W, min(tile, W), overlap))


def test_blend_weights_are_smooth_across_the_overlap():
    """No hard switch from one tile to the next: inside a 16-pixel overlap, neighbouring pixels'
    weights differ by at most pi/(2*15) (the raised cosine's steepest slope over 16 samples from 0 to 1)."""
    tv = TiledVelocity(None, 32, 16)
    tiles, norm = tv.grid(32, 80)
    for wt in norm:
        row = wt[0].double()
        assert (row[1:] - row[:-1]).abs().max() <= np.pi / 30 + 1e-6


def test_overlap_must_be_smaller_than_the_tile():
    with pytest.raises(ValueError, match="overlap"):
        TiledVelocity(None, 8, 8)


# ------------------------------------------------------------------ tiled vs whole


def test_one_tile_larger_than_the_latent_is_bitwise_the_untiled_call():
    noise, z_lq = photo_latents(48)
    model = LocalModel(3)
    for tile in (z_lq.shape[-1], 100):
        assert torch.equal(TiledVelocity(model, tile, 8)(noise, 0.7, z_lq, 0.2), model(noise, 0.7, z_lq, 0.2))


def test_pointwise_model_tiled_equals_untiled_everywhere():
    """A 1x1 model has no context to lose: any grid must reproduce it (weights sum to 1)."""
    noise, z_lq = photo_latents()
    model = LocalModel(1)
    full = model(noise, 0.7, z_lq, 0.2)
    for tile, overlap in [(10, 4), (7, 2), (16, 0), (9, 8)]:
        tiled = TiledVelocity(model, tile, overlap)(noise, 0.7, z_lq, 0.2)
        torch.testing.assert_close(tiled, full, atol=1e-5, rtol=0)


def test_no_seams_on_a_real_photo_with_a_3x3_model():
    """Tiles of a 3x3 model agree with the whole latent everywhere, blend zones included.

    Only a tile's outermost pixel sees the tile border (zero padding) instead of its neighbour, and
    the blend ramp gives that pixel weight 0, so tiled == untiled up to float rounding.
    """
    noise, z_lq = photo_latents()
    H, W = z_lq.shape[-2:]
    model = LocalModel(3)
    full = model(noise, 0.7, z_lq, 0.2)
    for tile, overlap in [(10, 4), (12, 6), (16, 8)]:
        tv = TiledVelocity(model, tile, overlap)
        assert len(tv.grid(H, W)[0]) >= 4, "the test needs a real grid"
        covered = torch.zeros(H, W)
        for y, x, h, w in tv.grid(H, W)[0]:
            covered[y : y + h, x : x + w] += 1
        assert (covered >= 2).sum() > 0.2 * H * W, "blend zones must be a real part of the image"
        torch.testing.assert_close(tv(noise, 0.7, z_lq, 0.2), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("B", [1, 2])
def test_tile_batches_equal_one_tile_at_a_time(B):
    noise, z_lq = photo_latents(64)
    noise, z_lq = noise.repeat(B, 1, 1, 1), z_lq.repeat(B, 1, 1, 1)
    if B == 2:  # two different images in one batch: tile batching must not mix them up
        noise[1], z_lq[1] = -noise[1], z_lq[1].flip(-1)
    model = LocalModel(3)
    one = TiledVelocity(model, 8, 3, batch=1)(noise, 0.7, z_lq, 0.2)
    n_tiles = len(model.calls)
    model.calls.clear()
    many = TiledVelocity(model, 8, 3, batch=4)(noise, 0.7, z_lq, 0.2)
    assert len(model.calls) == -(-n_tiles // 4) and model.calls[0][0] == 4 * B
    torch.testing.assert_close(many, one, atol=1e-5, rtol=0)  # batched conv may sum in another order
    if B == 2:  # each image equals its own run
        alone = TiledVelocity(model, 8, 3, batch=3)(noise[1:], 0.7, z_lq[1:], 0.2)
        torch.testing.assert_close(many[1:], alone, atol=1e-5, rtol=0)
