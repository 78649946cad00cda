"""Latent codecs E/D (DESIGN.md section 3): `encode(x) -> z`, `decode(z) -> x`, images in [-1, 1]."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class PixelUnshuffleCodec(nn.Module):
    """Space-to-depth by `factor`: exact, parameter-free and fast on a CPU.

    `scale` multiplies the latent so that its spread is closer to the unit-variance noise.
    """

    def __init__(self, factor: int = 4, channels: int = 3, scale: float = 1.0):
        super().__init__()
        self.factor, self.scale = factor, scale
        self.latent_channels = channels * factor * factor
        self.downsample = factor  # image pixels per latent pixel

    def encode(self, x):
        return F.pixel_unshuffle(x, self.factor) * self.scale

    def decode(self, z):
        return F.pixel_shuffle(z / self.scale, self.factor)

    def config(self) -> dict:
        return {"type": "pixel-unshuffle", "factor": self.factor, "scale": self.scale}


class DiffusersAutoencoder(nn.Module):
    """A diffusers autoencoder (AutoencoderKL / AutoencoderTiny / AutoencoderKLQwenImage) behind the same interface.

    Latents are normalised as the pipelines do: z = (E(x) - shift) * scale, or per channel
    (E(x) - mean) / std when the VAE config has `latents_mean`/`latents_std` (Qwen-Image).
    """

    def __init__(self, vae: nn.Module, tiled: bool = True):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        self.video = type(vae).__name__ == "AutoencoderKLQwenImage"  # 5-D (B, C, T, H, W) latents
        self.latent_channels = cfg.get("z_dim", None) or cfg.latent_channels
        mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
        if mean is not None and std is not None:
            shape = (1, -1, 1, 1)
            self.register_buffer("mean", torch.tensor(mean).view(shape), persistent=False)
            self.register_buffer("inv_std", 1.0 / torch.tensor(std).view(shape), persistent=False)
        else:
            self.register_buffer("mean", torch.tensor(cfg.get("shift_factor") or 0.0), persistent=False)
            self.register_buffer("inv_std", torch.tensor(cfg.get("scaling_factor") or 1.0), persistent=False)
        self.downsample = 2 ** (len(cfg.get("block_out_channels", None) or cfg.get("dim_mult", [1, 2, 4, 4])) - 1)
        if tiled and hasattr(vae, "enable_tiling"):
            vae.enable_tiling()  # bounded memory on large images; diffusers blends its tiles

    def encode(self, x):
        x = x.to(self.vae.dtype)
        if self.video:
            x = x.unsqueeze(2)
        out = self.vae.encode(x)
        z = out.latents if hasattr(out, "latents") else out.latent_dist.mode()
        if self.video:
            z = z.squeeze(2)
        return (z.float() - self.mean) * self.inv_std

    def decode(self, z):
        z = (z / self.inv_std + self.mean).to(self.vae.dtype)
        if self.video:
            z = z.unsqueeze(2)
        x = self.vae.decode(z).sample
        return (x.squeeze(2) if self.video else x).float()


def bicubic_up(x: torch.Tensor, scale: int) -> torch.Tensor:
    """Images in [-1, 1] -> bicubic x`scale`, clamped to [-1, 1]: the LQ image as the model's condition sees it."""
    return F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False).clamp_(-1, 1)


def encode_lq(codec: nn.Module, x: torch.Tensor, scale: int) -> torch.Tensor:
    """The condition latent z_lq of an LQ image x in [-1, 1] (DESIGN.md section 1): E(bicubic x`scale`)."""
    return codec.encode(bicubic_up(x, scale))


def build_codec(cfg: dict) -> nn.Module:
    if cfg.get("type", "pixel-unshuffle") == "pixel-unshuffle":
        return PixelUnshuffleCodec(factor=cfg.get("factor", 4), scale=cfg.get("scale", 1.0))
    raise ValueError(f"unknown codec type {cfg.get('type')!r}; a diffusers VAE is built by its backbone adapter")
