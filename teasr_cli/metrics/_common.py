"""Shared helpers: input checks, BT.601 luma, and the weight files (shipped, or fetched once)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import ModelError, TeasrError
from .sources import FETCHED

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


class MetricError(TeasrError):
    """Images handed to a metric have the wrong shape, range or size."""


def check_images(*imgs: torch.Tensor, min_size: int = 1) -> None:
    """Every metric takes float (B, 3, H, W) RGB in [0, 1]; pairs must match."""
    for x in imgs:
        if x.ndim != 4 or x.shape[1] != 3 or not x.is_floating_point():
            raise MetricError(
                f"metric input must be a float (B, 3, H, W) RGB tensor in [0, 1], got {x.dtype} {tuple(x.shape)}"
            )
        if min(x.shape[-2:]) < min_size:
            raise MetricError(
                f"image of {x.shape[-1]}x{x.shape[-2]} is too small for this metric: "
                f"it needs at least {min_size}x{min_size} pixels"
            )
    if len({tuple(x.shape) for x in imgs}) > 1:
        shapes = " vs ".join(str(tuple(x.shape)) for x in imgs)
        raise MetricError(f"SR and HR images differ in shape ({shapes}): compare images of the same size")


def rgb_to_y(x: torch.Tensor) -> torch.Tensor:
    """BT.601 luma in [16, 235] (MATLAB rgb2ycbcr / BasicSR), (B, 3, H, W) -> (B, 1, H, W)."""
    w = x.new_tensor([65.481, 128.553, 24.966]).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True) + 16.0


@lru_cache(maxsize=None)
def _load(name: str) -> dict[str, torch.Tensor]:
    path = FETCHED[name]() if name in FETCHED else WEIGHTS_DIR / f"{name}.safetensors"
    if not path.is_file():
        raise ModelError(f"metric weights {path} are missing: reinstall teasr or run scripts/convert_metric_weights.py")
    return load_file(str(path))


def load_weights(name: str, dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
    """Tensors of a weight file (cached in memory; fp16 files are upcast to compute in fp32)."""
    return {k: (v if dtype is None else v.to(dtype)) for k, v in _load(name).items()}
