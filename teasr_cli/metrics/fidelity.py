"""PSNR and SSIM on the Y channel, computed the way SR papers (BasicSR/MATLAB) do.

Both work in float64 on Y = 16 + 65.481 R + 128.553 G + 24.966 B with inputs
in [0, 1], so Y lives on a [0, 255] scale; no rounding to 8 bits is applied.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import check_images, rgb_to_y


def _y_pair(
    sr: torch.Tensor, hr: torch.Tensor, crop_border: int, min_size: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    check_images(sr, hr, min_size=2 * crop_border + min_size)
    if crop_border:
        c = crop_border
        sr, hr = sr[..., c:-c, c:-c], hr[..., c:-c, c:-c]
    return rgb_to_y(sr.double()), rgb_to_y(hr.double())


def psnr_y(sr: torch.Tensor, hr: torch.Tensor, crop_border: int = 0) -> torch.Tensor:
    """PSNR in dB on Y, peak 255; (B,), higher is better; identical images give +inf."""
    a, b = _y_pair(sr, hr, crop_border)
    mse = (a - b).pow(2).mean(dim=(1, 2, 3))
    return 10.0 * torch.log10(255.0**2 / mse)  # mse == 0 -> +inf, no NaN


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    g = torch.exp(-((torch.arange(size, dtype=torch.float64) - (size - 1) / 2) ** 2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).view(1, 1, size, size)


def ssim_y(sr: torch.Tensor, hr: torch.Tensor, crop_border: int = 0) -> torch.Tensor:
    """SSIM on Y with an 11x11 gaussian (sigma 1.5) window; (B,), higher is better, 1 = identical.

    Statistics are taken over the 'valid' region only (no padding), with
    C1 = (0.01 * 255)^2 and C2 = (0.03 * 255)^2, as in Wang et al. and BasicSR.
    """
    a, b = _y_pair(sr, hr, crop_border, min_size=11)
    w = _gaussian_window().to(a.device)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu_a, mu_b = F.conv2d(a, w), F.conv2d(b, w)
    var_a = F.conv2d(a * a, w) - mu_a**2
    var_b = F.conv2d(b * b, w) - mu_b**2
    cov = F.conv2d(a * b, w) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return ssim_map.mean(dim=(1, 2, 3))
