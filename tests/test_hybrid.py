"""The hybrid native form (conv trunks at latent resolution around the dual-branch DiT) and the any-step exactness."""

import pytest
import torch
from conftest import randomize

from teasr_cli.codecs import PixelUnshuffleCodec
from teasr_cli.folders import load_pretrained, model_config, save_pretrained
from teasr_cli.lora import add_lora
from teasr_cli.model import DiTConfig, TeasrDiT
from teasr_cli.sampler import sample
from teasr_cli.tiling import TiledVelocity, tile_starts

HYBRID = dict(
    latent_channels=48,
    patch_size=2,
    hidden_size=32,
    depth=2,
    num_heads=2,
    prediction="x0",
    trunk_channels=8,
    trunk_depth=2,
    stem_depth=1,
    decoder_depth=1,
)


def hybrid(seed=0, **overrides) -> TeasrDiT:
    torch.manual_seed(seed)
    return randomize(TeasrDiT(DiTConfig(**{**HYBRID, **overrides})), seed).eval()


def latents(B=1, H=6, W=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, 48, H, W, generator=g), torch.randn(B, 48, H, W, generator=g)


def record(model, name):
    """Outputs of model.<name> on every call."""
    seen = []
    getattr(model, name).register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    return seen


@pytest.mark.parametrize("overrides", [{}, {"depth": 0}, {"prediction": "v"}])
@pytest.mark.parametrize("H, W", [(6, 10), (5, 7)])
def test_any_latent_size_gives_a_velocity_of_the_same_shape(overrides, H, W):
    z, zl = latents(B=2, H=H, W=W)
    v = hybrid(**overrides)(z, 0.7, zl, torch.tensor([0.2, 0.5]))
    assert v.shape == z.shape and torch.isfinite(v).all()


def test_fresh_hybrid_starts_at_the_lq_latent():
    """Zero-initialised output conv: one step from t = 1 lands on the bicubic latent, as the plain form does."""
    torch.manual_seed(0)
    model = TeasrDiT(DiTConfig(**HYBRID)).eval()
    z, zl = latents()
    torch.testing.assert_close(z - model(z, 1.0, zl, 0.0), zl, atol=1e-6, rtol=0)


def test_decoupled_times_reach_conv_features_too():
    """DTC: the LQ trunk's features depend on t_tar only, the noise stem's on t_cur only."""
    model = hybrid()
    trunk, stem = record(model, "trunk"), record(model, "stem")
    z, zl = latents()
    with torch.no_grad():
        model(z, 0.8, zl, 0.3)
        model(z, 0.8, zl, -0.6)  # other t_tar
        model(z, 0.4, zl, -0.6)  # other t_cur
    assert torch.equal(stem[0], stem[1]) and not torch.equal(stem[1], stem[2])
    assert torch.equal(trunk[1], trunk[2]) and not torch.equal(trunk[0], trunk[1])


def test_sad_lora_trains_the_condition_path_only():
    """Stage sad: the LoRA plus the condition-only modules (LQ trunk, condition embedders) train; the noise path
    (stem, noise embedder, base weights) stays the frozen prior, so its features do not move when they change."""
    model = add_lora(hybrid(), rank=4, alpha=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith(("trunk.", "c_embedder.", "t2_embedder.")) for n in trainable)
    assert any(n.startswith("trunk.") for n in trainable) and any("lora_" in n for n in trainable)
    stem = record(model, "stem")
    z, zl = latents()
    with torch.no_grad():
        before = model(z, 0.8, zl, 0.3)
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
        after = model(z, 0.8, zl, 0.3)
    assert torch.equal(stem[0], stem[1]) and not torch.allclose(before, after)


def test_save_load_round_trip_is_bitwise(tmp_path):
    model = hybrid(seed=3)
    save_pretrained(model, model_config(model.config, PixelUnshuffleCodec(4).config()), tmp_path / "m")
    loaded, config = load_pretrained(tmp_path / "m")
    assert config["model"]["trunk_channels"] == 8
    z, zl = latents()
    with torch.no_grad():
        assert torch.equal(loaded(z, 0.5, zl, 0.0), model(z, 0.5, zl, 0.0))


def test_one_tile_covering_the_latent_is_the_untiled_call_and_tiles_share_the_token_grid():
    model = hybrid()
    z, zl = latents(H=12, W=14)
    with torch.no_grad():
        assert torch.equal(TiledVelocity(model, 16, 4, align=2)(z, 0.6, zl, 0.1), model(z, 0.6, zl, 0.1))
        tiled = TiledVelocity(model, 8, 4, align=2)
        v = tiled(z, 0.6, zl, 0.1)
    assert v.shape == z.shape and torch.isfinite(v).all()
    tiles, _ = tiled.grid(12, 14)
    assert len(tiles) > 1 and all(y % 2 == 0 and x % 2 == 0 for y, x, _, _ in tiles)


@pytest.mark.parametrize(
    "size, tile, overlap, align", [(100, 32, 8, 4), (37, 16, 4, 4), (300, 64, 16, 4), (64, 64, 8, 4)]
)
def test_aligned_tile_starts_cover_the_range(size, tile, overlap, align):
    starts = tile_starts(size, tile, overlap, align)
    assert starts[0] == 0 and all(s % align == 0 for s in starts) and starts == sorted(set(starts))
    ends = [s + tile for s in starts[:-1]] + [size]  # the last tile runs on to the border
    assert size - starts[-1] < tile + align
    assert all(end - nxt >= overlap - (align - 1) for end, nxt in zip(ends, starts[1:]))  # no gaps, overlap kept


@pytest.mark.parametrize("steps", [1, 4, 20, 30, 50])
def test_a_perfect_x0_model_reaches_the_data_exactly_at_any_step_count(steps):
    """x0-prediction returns v = (z_t - x0) / t. A clamp max(t, t_min) in sampling under-shoots once a step starts
    below t_min (1.1% of the path left at 30 steps); jumps divide by t_cur itself. The oracle: a fresh model
    whose zero output conv gets a bias, so it predicts x0 = z_lq + bias exactly, which is the target here."""
    torch.manual_seed(0)
    model = TeasrDiT(DiTConfig(**HYBRID)).eval()
    offset = torch.linspace(-1, 1, 48)
    model.decoder_out.bias.data.copy_(offset)
    g = torch.Generator().manual_seed(0)
    z_lq, noise = (torch.randn(1, 48, 4, 6, generator=g) for _ in range(2))
    target = z_lq + offset.view(1, -1, 1, 1)
    torch.testing.assert_close(sample(model, noise, z_lq, steps), target, atol=1e-5, rtol=0)
    model.train()  # training keeps the clamp: its targets stay bounded near t = 0
    v = model(noise, 0.01, z_lq, 0.0)
    torch.testing.assert_close(v, (noise - target) / model.config.t_min, atol=1e-5, rtol=0)
