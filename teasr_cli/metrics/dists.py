"""DISTS (Ding et al. 2020): structure + texture similarity on VGG16 features, lower is better."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._common import check_images, load_weights
from .backbones import vgg16_features

_CHANNELS = (3, 64, 128, 256, 512, 512)  # the image itself, then the five VGG stages


class L2Pool(nn.Module):
    """Hanning-weighted L2 pooling (stride 2): an anti-aliased stand-in for max-pool."""

    def __init__(self, channels: int):
        super().__init__()
        a = torch.tensor([0.5, 1.0, 0.5])  # np.hanning(5)[1:-1]
        g = a[:, None] * a[None, :]
        self.register_buffer("filter", (g / g.sum()).expand(channels, 1, 3, 3).clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.conv2d(x * x, self.filter, stride=2, padding=1, groups=x.shape[1])
        return (out + 1e-12).sqrt()


class DISTS(nn.Module):
    """`DISTS()(x, y)` -> (B,) distances for (B, 3, H, W) images in [0, 1]; ~0 = identical."""

    def __init__(self):
        super().__init__()
        self.net = vgg16_features(pool=L2Pool)
        w = load_weights("dists")
        total = w["alpha"].sum() + w["beta"].sum()
        self.register_buffer("alpha", w["alpha"] / total, persistent=False)
        self.register_buffer("beta", w["beta"] / total, persistent=False)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        check_images(x, y)
        n = x.shape[0]
        xy = torch.cat([x, y])
        feats = [xy] + self.net((xy - self.mean) / self.std)
        c1 = c2 = 1e-6
        alphas, betas = self.alpha.split(_CHANNELS), self.beta.split(_CHANNELS)
        sim = x.new_zeros(n)
        for f, a, b in zip(feats, alphas, betas):
            fx, fy = f[:n], f[n:]
            mx, my = fx.mean(dim=(2, 3)), fy.mean(dim=(2, 3))
            vx = (fx - mx[..., None, None]).pow(2).mean(dim=(2, 3))
            vy = (fy - my[..., None, None]).pow(2).mean(dim=(2, 3))
            cov = (fx * fy).mean(dim=(2, 3)) - mx * my
            texture = (2 * mx * my + c1) / (mx**2 + my**2 + c1)  # "S1": compares means
            structure = (2 * cov + c2) / (vx + vy + c2)  # "S2": compares correlations
            sim = sim + texture @ a + structure @ b
        return 1 - sim
