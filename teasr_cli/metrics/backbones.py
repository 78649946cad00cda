"""ImageNet AlexNet / VGG16 feature extractors without torchvision.

Layer indices follow torchvision's `features` Sequential, so the shipped
weight files (`features.<idx>.weight`) load by name. Each extractor returns
the activations after the ReLUs that LPIPS/DISTS tap.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from ._common import load_weights

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


class TappedFeatures(nn.Module):
    """A frozen Sequential that also returns the outputs of the layers in `taps`."""

    def __init__(self, layers: list[nn.Module], taps: tuple[int, ...], weights: str):
        super().__init__()
        self.features = nn.Sequential(*layers)
        self.taps = taps
        self.load_state_dict(load_weights(weights), strict=True)
        self.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features[: self.taps[-1] + 1]):
            x = layer(x)
            if i in self.taps:
                out.append(x)
        return out


def alexnet_features() -> TappedFeatures:
    """relu1..relu5 of torchvision's AlexNet (64, 192, 384, 256, 256 channels)."""
    layers = [
        nn.Conv2d(3, 64, 11, stride=4, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1),
        nn.ReLU(),
    ]
    return TappedFeatures(layers, (1, 4, 7, 9, 11), "alexnet")


def vgg16_features(pool: Callable[[int], nn.Module] | None = None) -> TappedFeatures:
    """relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of VGG16 (`pool(channels)` replaces max-pool)."""
    layers: list[nn.Module] = []
    ch = 3
    for v in VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2) if pool is None else pool(ch))
        else:
            layers += [nn.Conv2d(ch, v, 3, padding=1), nn.ReLU()]
            ch = v
    return TappedFeatures(layers, (3, 8, 15, 22, 29), "vgg16")
