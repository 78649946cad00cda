"""LPIPS v0.1 (Zhang et al. 2018): learned perceptual distance, lower is better.

Also used as a training loss, so it is differentiable w.r.t. its inputs, its
own parameters are frozen, and both images go through the backbone in one
batch.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ._common import check_images, load_weights
from .backbones import alexnet_features, vgg16_features

# AlexNet's two stride-2 max-pools after the stride-4 conv need >= 31 pixels.
_MIN_SIZE = {"alex": 31, "vgg": 16}


class LPIPS(nn.Module):
    """`LPIPS(net)(x, y)` -> (B,) distances for (B, 3, H, W) images in [0, 1]; 0 = identical."""

    def __init__(self, net: str = "alex"):
        super().__init__()
        if net not in _MIN_SIZE:
            raise ValueError(f"LPIPS net must be 'alex' or 'vgg', got {net!r}")
        self.net_name = net
        self.net = alexnet_features() if net == "alex" else vgg16_features()
        heads = load_weights("lpips_heads")
        for k in range(5):  # per-channel weights of the 1x1 "lin" layers, as buffers
            self.register_buffer(f"lin{k}", heads[f"{net}.{k}"], persistent=False)
        # LPIPS's ScalingLayer: maps [-1, 1] inputs to ImageNet-normalised ones.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        check_images(x, y, min_size=_MIN_SIZE[self.net_name])
        n = x.shape[0]
        h = (torch.cat([x, y]) * 2 - 1 - self.shift) / self.scale
        dist = x.new_zeros(n)
        for k, f in enumerate(self.net(h)):
            f = f / (f.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)  # unit length over channels
            d = (f[:n] - f[n:]).pow(2).mean(dim=(2, 3))  # 1x1 conv and spatial mean commute
            dist = dist + d @ getattr(self, f"lin{k}")
        return dist
