"""Image-quality metrics that SR papers report, without torchvision.

Every per-image metric takes float (B, 3, H, W) RGB tensors in [0, 1] and
returns a (B,) tensor. Full-reference metrics are called `m(sr, hr)`,
no-reference ones `m(sr)`. `METRICS` tells `teasr eval` how to build each one
and which direction is better; FID works on folders and lives in `fid()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ._common import MetricError, rgb_to_y
from .dists import DISTS
from .fidelity import psnr_y, ssim_y
from .frechet import FIDInceptionV3, FIDUnavailableError, fid, fid_from_features, frechet_distance
from .lpips import LPIPS
from .nss import niqe


@dataclass(frozen=True)
class MetricSpec:
    """How `teasr eval` builds a metric; call the result under torch.no_grad() when evaluating."""

    name: str
    higher_is_better: bool
    needs_reference: bool  # True: fn(sr, hr); False: fn(sr)
    build: Callable[..., Callable[..., torch.Tensor]]  # build(**kwargs) -> fn
    description: str


def _module(cls, *args):
    # Modules load their weights when built, so `teasr eval` builds only what it uses.
    return lambda **_: cls(*args).eval()


def _fn(f):
    def build(**kwargs):
        return (lambda *x: f(*x, **kwargs)) if kwargs else f

    return build


METRICS: dict[str, MetricSpec] = {
    "psnr": MetricSpec("psnr", True, True, _fn(psnr_y), "PSNR on Y (BT.601), dB; kwargs: crop_border"),
    "ssim": MetricSpec("ssim", True, True, _fn(ssim_y), "SSIM on Y (BT.601), 11x11 gaussian; kwargs: crop_border"),
    "lpips": MetricSpec("lpips", False, True, _module(LPIPS, "alex"), "LPIPS v0.1, AlexNet"),
    "lpips-vgg": MetricSpec("lpips-vgg", False, True, _module(LPIPS, "vgg"), "LPIPS v0.1, VGG16"),
    "dists": MetricSpec("dists", False, True, _module(DISTS), "DISTS (VGG16 structure + texture)"),
    "niqe": MetricSpec("niqe", False, False, _fn(niqe), "NIQE (MATLAB release model), no reference"),
}

__all__ = [
    "DISTS",
    "FIDInceptionV3",
    "FIDUnavailableError",
    "LPIPS",
    "METRICS",
    "MetricError",
    "MetricSpec",
    "fid",
    "fid_from_features",
    "frechet_distance",
    "niqe",
    "psnr_y",
    "rgb_to_y",
    "ssim_y",
]
