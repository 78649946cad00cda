"""Real-ESRGAN second-order degradation (DESIGN section 7), in torch, per image.

HQ crop -> [stage 1: blur, resize, noise, JPEG] -> [stage 2: blur?, resize, noise]
-> final: 50/50 [resize to H/scale + sinc, JPEG] or [JPEG, resize + sinc] -> LQ.

Every image of a batch draws its own parameters from one `torch.Generator`, so a
batch is reproducible from its seed. Resizing makes the images' sizes diverge,
so only the first (largest, most expensive) blur runs batched; the rest runs
image by image. JPEG goes through a real encoder (Pillow), like the artefacts
of real photos, instead of a differentiable approximation. (Real-ESRGAN also
unsharp-masks the HQ *target*; that is a training-target choice, not done here.)
"""

from __future__ import annotations

import io
import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from teasr_cli.errors import TeasrError

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
RESIZE_MODES = ("area", "bilinear", "bicubic")


class DegradeConfigError(TeasrError):
    """A degradation config or preset is invalid."""


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class StageConfig:
    """One degradation order. Probabilities and [lo, hi] ranges as in Real-ESRGAN."""

    blur_prob: float = 1.0  # stage 2 skips its blur 20% of the time
    kernel_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)  # order of KERNEL_TYPES
    sinc_prob: float = 0.1  # replaces the blur kernel by a sinc (ringing)
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)  # generalized Gaussian shape
    betap_range: tuple[float, float] = (1.0, 2.0)  # plateau shape
    resize_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)
    noise_prob: float = 1.0  # Real-ESRGAN always adds noise; 0 turns it off
    gaussian_noise_prob: float = 0.5  # else Poisson
    noise_range: tuple[float, float] = (1.0, 30.0)  # Gaussian sigma in 8-bit levels
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (30.0, 95.0)  # stage 2's is used by the final step

    def __post_init__(self):
        for name in ("kernel_probs", "resize_probs"):
            p = tuple(float(x) for x in getattr(self, name))
            object.__setattr__(self, name, p)
            if any(x < 0 for x in p) or abs(sum(p) - 1.0) > 1e-6:
                raise DegradeConfigError(f"degradation {name} {p} must be non-negative and sum to 1")
        if len(self.kernel_probs) != len(KERNEL_TYPES) or len(self.resize_probs) != 3:
            raise DegradeConfigError(
                f"degradation kernel_probs needs {len(KERNEL_TYPES)} values and resize_probs 3 (up, down, keep)"
            )
        for name in (
            "blur_sigma",
            "betag_range",
            "betap_range",
            "resize_range",
            "noise_range",
            "poisson_scale_range",
            "jpeg_range",
        ):
            lo, hi = (float(x) for x in getattr(self, name))
            object.__setattr__(self, name, (lo, hi))
            if not 0 <= lo <= hi:
                raise DegradeConfigError(f"degradation {name} ({lo}, {hi}) must satisfy 0 <= lo <= hi")
        if not (1 <= self.jpeg_range[0] and self.jpeg_range[1] <= 100):
            raise DegradeConfigError(f"degradation jpeg_range {self.jpeg_range} must lie in [1, 100]")


_STAGE2 = StageConfig(
    blur_prob=0.8,
    blur_sigma=(0.2, 1.5),
    resize_probs=(0.3, 0.4, 0.3),
    resize_range=(0.3, 1.2),
    noise_range=(1.0, 25.0),
    poisson_scale_range=(0.05, 2.5),
)


@dataclass(frozen=True)
class DegradeConfig:
    """Real-ESRGAN x4plus degradation (the defaults are DESIGN section 7)."""

    scale: int = 4
    kernel_size: int = 21  # kernels are drawn with odd sizes 7..kernel_size
    rotation_range: tuple[float, float] = (-math.pi, math.pi)  # anisotropic kernels
    sinc_omega_small: tuple[float, float] = (math.pi / 3, math.pi)  # stage sinc, size < 13
    sinc_omega_large: tuple[float, float] = (math.pi / 5, math.pi)  # stage sinc, size >= 13
    stage1: StageConfig = field(default_factory=StageConfig)
    stage2: StageConfig = _STAGE2
    final_sinc_prob: float = 0.8
    final_sinc_omega: tuple[float, float] = (math.pi / 3, math.pi)
    final_jpeg_first_prob: float = 0.5  # JPEG before (else after) the final resize + sinc
    resize_modes: tuple[str, ...] = RESIZE_MODES

    def __post_init__(self):
        # Accept plain dicts/lists, as they come out of a TOML/JSON training config.
        for name in ("stage1", "stage2"):
            if isinstance(getattr(self, name), dict):
                object.__setattr__(self, name, StageConfig(**getattr(self, name)))
        object.__setattr__(self, "resize_modes", tuple(self.resize_modes))
        if self.scale < 1 or self.kernel_size < 7 or self.kernel_size % 2 == 0:
            raise DegradeConfigError(
                f"degradation needs scale >= 1 and an odd kernel_size >= 7 "
                f"(got scale={self.scale}, kernel_size={self.kernel_size})"
            )
        if not self.resize_modes or any(m not in RESIZE_MODES for m in self.resize_modes):
            raise DegradeConfigError(
                f"degradation resize_modes {self.resize_modes} must be a non-empty subset of {', '.join(RESIZE_MODES)}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


# The "mild" preset is our own milder variant in the spirit of PiSA-SR/SeeSR-style
# training: the same pipeline with half the blur, a narrower down-scaling range,
# about half the noise, light JPEG only ([70, 95]) and fewer sinc/ringing kernels.
_MILD = DegradeConfig(
    stage1=StageConfig(
        sinc_prob=0.05,
        blur_sigma=(0.2, 1.5),
        resize_range=(0.5, 1.5),
        noise_range=(1.0, 15.0),
        poisson_scale_range=(0.05, 1.5),
        jpeg_range=(70.0, 95.0),
    ),
    stage2=replace(
        _STAGE2,
        blur_prob=0.5,
        sinc_prob=0.05,
        blur_sigma=(0.2, 1.0),
        resize_range=(0.6, 1.2),
        noise_range=(1.0, 10.0),
        poisson_scale_range=(0.05, 1.0),
        jpeg_range=(70.0, 95.0),
    ),
    final_sinc_prob=0.5,
)

PRESETS: dict[str, DegradeConfig] = {"realesrgan": DegradeConfig(), "mild": _MILD}
LR_KINDS = (*PRESETS, "bicubic")  # how an LR image can be made: a preset, or plain bicubic downscaling


def get_preset(name: str) -> DegradeConfig:
    if name not in PRESETS:
        raise DegradeConfigError(f"unknown degradation preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return PRESETS[name]


# ----------------------------------------------------------------------------- random draws


def _rand(g: torch.Generator) -> float:
    return torch.rand(1, generator=g, device=g.device).item()


def _uniform(g: torch.Generator, lo_hi: tuple[float, float]) -> float:
    lo, hi = lo_hi
    return lo + (hi - lo) * _rand(g)


def _choice(g: torch.Generator, probs) -> int:
    """Index drawn with the given probabilities (inverse CDF of one uniform)."""
    u, acc = _rand(g), 0.0
    for i, p in enumerate(probs):
        acc += p
        if u < acc:
            return i
    return max(i for i, p in enumerate(probs) if p > 0)  # u landed in the rounding slack


def _odd_size(g: torch.Generator, max_size: int) -> int:
    return 7 + 2 * int(_rand(g) * ((max_size - 7) // 2 + 1))


# ----------------------------------------------------------------------------- kernels


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    return torch.meshgrid(r, r, indexing="xy")  # x varies along columns, y along rows


def blur_kernel(
    kind: str, size: int, sigma_x: float, sigma_y: float | None = None, theta: float = 0.0, beta: float = 1.0
) -> torch.Tensor:
    """(size, size) float64 kernel summing to 1 for one of KERNEL_TYPES.

    With Q = c^T S^-1 c (S = R diag(sx^2, sy^2) R^T, R rotation by theta):
    Gaussian exp(-Q/2), generalized exp(-Q^beta / 2), plateau 1 / (1 + Q^beta).
    Isotropic kinds ignore sigma_y and theta.
    """
    if kind not in KERNEL_TYPES:
        raise DegradeConfigError(f"unknown blur kernel {kind!r}; choose one of: {', '.join(KERNEL_TYPES)}")
    if kind.endswith("iso") and not kind.endswith("aniso"):
        sigma_y, theta = sigma_x, 0.0
    sigma_y = sigma_x if sigma_y is None else sigma_y
    x, y = _grid(size)
    c, s = math.cos(theta), math.sin(theta)
    u, v = c * x + s * y, -s * x + c * y  # coordinates in the kernel's principal axes
    q = (u / sigma_x) ** 2 + (v / sigma_y) ** 2
    if kind.startswith("plateau"):
        k = 1.0 / (q**beta + 1.0)
    else:
        k = torch.exp(-0.5 * q ** (beta if kind.startswith("generalized") else 1.0))
    return k / k.sum()


def sinc_kernel(omega_c: float, size: int, pad_to: int = 0) -> torch.Tensor:
    """Circular low-pass (2-D sinc) kernel with cutoff omega_c in radians/pixel, summing to 1.

    h(r) = omega_c J1(omega_c r) / (2 pi r), the ideal disc-shaped low-pass; it rings,
    which is how Real-ESRGAN imitates over-sharpened / ringing real photos.
    """
    x, y = _grid(size)
    r = torch.sqrt(x**2 + y**2)
    centre = torch.full_like(r, omega_c**2 / (4 * math.pi))  # the r -> 0 limit
    k = torch.where(r > 0, omega_c * torch.special.bessel_j1(omega_c * r) / (2 * math.pi * r.clamp_min(1e-12)), centre)
    k = k / k.sum()
    return _pad_kernel(k, pad_to) if pad_to > size else k


def _pad_kernel(k: torch.Tensor, size: int) -> torch.Tensor:
    p = (size - k.shape[-1]) // 2
    return F.pad(k, (p, p, p, p))


def random_kernel(st: StageConfig, cfg: DegradeConfig, g: torch.Generator) -> torch.Tensor:
    """One stage blur kernel (mixed Gaussian family or sinc), zero-padded to cfg.kernel_size."""
    size = _odd_size(g, cfg.kernel_size)
    if _rand(g) < st.sinc_prob:
        k = sinc_kernel(_uniform(g, cfg.sinc_omega_small if size < 13 else cfg.sinc_omega_large), size)
    else:
        kind = KERNEL_TYPES[_choice(g, st.kernel_probs)]
        sx = _uniform(g, st.blur_sigma)
        sy, theta = (_uniform(g, st.blur_sigma), _uniform(g, cfg.rotation_range)) if "aniso" in kind else (sx, 0.0)
        beta = 1.0
        if kind.startswith(("generalized", "plateau")):
            lo, hi = st.betag_range if kind.startswith("generalized") else st.betap_range
            # Half the draws below 1, half above, as Real-ESRGAN does: shapes both
            # sharper-peaked and flatter than a Gaussian stay equally likely.
            beta = _uniform(g, (lo, 1.0)) if _rand(g) < 0.5 else _uniform(g, (1.0, hi))
        k = blur_kernel(kind, size, sx, sy, theta, beta)
    return _pad_kernel(k, cfg.kernel_size)


# ----------------------------------------------------------------------------- operations


def filter2d(img: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Filter each image (B, C, H, W) with its own (B, k, k) kernel in one grouped conv2d."""
    b, c, h, w = img.shape
    k = kernels.shape[-1]
    p = k // 2
    # Reflect padding needs the image larger than the pad; tiny intermediate images
    # (a 0.15x down-scale of a small crop) fall back to edge replication.
    x = F.pad(img, (p, p, p, p), mode="reflect" if p < min(h, w) else "replicate")
    weight = kernels.to(img).repeat_interleave(c, dim=0).unsqueeze(1)  # (B*C, 1, k, k)
    return F.conv2d(x.reshape(1, b * c, h + 2 * p, w + 2 * p), weight, groups=b * c).view(b, c, h, w)


def resize(img: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize without antialiasing (as Real-ESRGAN: aliasing is part of the degradation)."""
    size = (max(1, int(size[0])), max(1, int(size[1])))
    if tuple(img.shape[-2:]) == size:
        return img
    align = None if mode == "area" else False
    return F.interpolate(img, size=size, mode=mode, align_corners=align)


def add_gaussian_noise(img: torch.Tensor, sigma: float, gray: bool, g: torch.Generator) -> torch.Tensor:
    """Add N(0, (sigma/255)^2) noise to (1, C, H, W); gray noise is shared by the channels."""
    shape = (img.shape[0], 1 if gray else img.shape[1], *img.shape[2:])
    noise = torch.randn(shape, generator=g, device=g.device, dtype=torch.float32).to(img)
    return (img + noise * (sigma / 255.0)).clamp(0, 1)


def add_poisson_noise(img: torch.Tensor, scale: float, gray: bool, g: torch.Generator) -> torch.Tensor:
    """Shot noise: Poisson counts with as many levels as the image has (rounded to a power of 2)."""
    base = img.clamp(0, 1)
    if gray:  # noise computed on the luma, then added equally to R, G and B
        base = (base * base.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    levels = len(torch.unique((base * 255).round()))
    levels = 2 ** math.ceil(math.log2(max(levels, 2)))
    counts = torch.poisson((base * levels).to(g.device, torch.float32), generator=g).to(img)
    return (img + (counts / levels - base) * scale).clamp(0, 1)


def jpeg(img: torch.Tensor, quality: int) -> torch.Tensor:
    """Round-trip one (C, H, W) or (1, C, H, W) image in [0, 1] through Pillow's JPEG codec."""
    x = img.reshape(img.shape[-3:])
    arr = (x.detach().clamp(0, 1) * 255).round().to("cpu", torch.uint8).permute(1, 2, 0).numpy()
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    out = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(out).permute(2, 0, 1).reshape(img.shape).to(img)


def _random_noise(img: torch.Tensor, st: StageConfig, g: torch.Generator) -> torch.Tensor:
    if _rand(g) >= st.noise_prob:
        return img
    gaussian = _rand(g) < st.gaussian_noise_prob
    gray = _rand(g) < st.gray_noise_prob
    if gaussian:
        return add_gaussian_noise(img, _uniform(g, st.noise_range), gray, g)
    return add_poisson_noise(img, _uniform(g, st.poisson_scale_range), gray, g)


def _random_mode(cfg: DegradeConfig, g: torch.Generator) -> str:
    return cfg.resize_modes[int(_rand(g) * len(cfg.resize_modes))]


def _random_scale(st: StageConfig, g: torch.Generator) -> float:
    lo, hi = st.resize_range
    kind = _choice(g, st.resize_probs)  # 0 up, 1 down, 2 keep
    if kind == 2:
        return 1.0
    return _uniform(g, (1.0, max(1.0, hi)) if kind == 0 else (min(lo, 1.0), 1.0))


def _jpeg_quality(st: StageConfig, g: torch.Generator) -> int:
    return int(round(_uniform(g, st.jpeg_range)))


# ----------------------------------------------------------------------------- pipeline


def _degrade_one(x: torch.Tensor, lq_hw: tuple[int, int], cfg: DegradeConfig, g: torch.Generator) -> torch.Tensor:
    """Everything after the first blur, for one (1, 3, h, w) image."""
    s1, s2 = cfg.stage1, cfg.stage2
    # Stage 1: resize relative to the current size, noise, JPEG.
    f = _random_scale(s1, g)
    x = resize(x, (x.shape[-2] * f, x.shape[-1] * f), _random_mode(cfg, g))
    x = jpeg(_random_noise(x, s1, g), _jpeg_quality(s1, g))
    # Stage 2: optional blur, resize relative to the *LQ* size (so "keep" lands on it), noise.
    if _rand(g) < s2.blur_prob:
        x = filter2d(x, random_kernel(s2, cfg, g)[None])
    f = _random_scale(s2, g)
    x = _random_noise(resize(x, (lq_hw[0] * f, lq_hw[1] * f), _random_mode(cfg, g)), s2, g)
    # Final: resize to the LQ size + sinc, and JPEG (stage 2's range), in a random order.
    sinc = None
    if _rand(g) < cfg.final_sinc_prob:
        sinc = sinc_kernel(_uniform(g, cfg.final_sinc_omega), _odd_size(g, cfg.kernel_size))[None]
    jpeg_first = _rand(g) < cfg.final_jpeg_first_prob
    mode, q = _random_mode(cfg, g), _jpeg_quality(s2, g)
    if jpeg_first:
        x = jpeg(x, q)
    x = resize(x, lq_hw, mode)
    x = filter2d(x, sinc) if sinc is not None else x
    if not jpeg_first:
        x = jpeg(x, q)
    return (x.clamp(0, 1) * 255).round() / 255  # LQ images are 8-bit, like real inputs


def degrade(hq: torch.Tensor, cfg: DegradeConfig, generator: torch.Generator) -> torch.Tensor:
    """(B, 3, H, W) HQ in [0, 1] -> (B, 3, H/scale, W/scale) LQ in [0, 1], per-image random parameters."""
    if hq.ndim != 4 or hq.shape[1] != 3:
        raise DegradeConfigError(f"degrade expects a (B, 3, H, W) batch, got shape {tuple(hq.shape)}")
    h, w = hq.shape[-2:]
    if h % cfg.scale or w % cfg.scale:
        raise DegradeConfigError(
            f"HQ crop {h}x{w} is not divisible by the scale {cfg.scale}; "
            f"use a crop size that is a multiple of {cfg.scale}"
        )
    hq = hq.float()
    # Stage 1 blur is always applied (blur_prob 1 by default) and all images still share
    # their size here: one grouped conv over the batch.
    kernels = [
        random_kernel(cfg.stage1, cfg, g=generator) if _rand(generator) < cfg.stage1.blur_prob else None
        for _ in range(hq.shape[0])
    ]
    delta = _pad_kernel(torch.ones(1, 1, dtype=torch.float64), cfg.kernel_size)
    x = filter2d(hq, torch.stack([delta if k is None else k for k in kernels]))
    lq_hw = (h // cfg.scale, w // cfg.scale)
    return torch.cat([_degrade_one(x[i : i + 1], lq_hw, cfg, generator) for i in range(x.shape[0])])


def downscale(x: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """Antialiased bicubic downscale of (B, C, H, W): clean LR, and the model of it that the sampler's
    consistency projections invert."""
    return F.interpolate(
        x, size=(x.shape[-2] // scale, x.shape[-1] // scale), mode="bicubic", align_corners=False, antialias=True
    )


def bicubic_lq(hq: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """Plain antialiased bicubic downscale of (3, H, W) or (B, 3, H, W), for "bicubic LR" sets."""
    out = downscale((hq[None] if hq.ndim == 3 else hq).float(), scale).clamp(0, 1)
    return out[0] if hq.ndim == 3 else out


def make_lq(hq: torch.Tensor, kind: str, generator: torch.Generator, scale: int = 4) -> torch.Tensor:
    """(B, 3, H, W) HQ -> LQ, by plain bicubic downscaling or a preset's degradation: the one place where
    training and evaluation make their LR."""
    if kind == "bicubic":
        return bicubic_lq(hq, scale)
    cfg = get_preset(kind)
    if cfg.scale != scale:
        raise DegradeConfigError(f"degradation preset {kind!r} has scale {cfg.scale}, the model needs {scale}")
    return degrade(hq, cfg, generator)


def random_crop_flip(img: torch.Tensor, size: int, generator: torch.Generator, rotate: bool = False) -> torch.Tensor:
    """Random (3, size, size) crop of (3, H, W) with a random horizontal flip.

    rotate=True also draws a vertical flip and a transpose (all 8 dihedral views),
    for textures and aerial images where orientation carries no meaning.
    """
    h, w = img.shape[-2:]
    if h < size or w < size:
        raise DegradeConfigError(
            f"training image {w}x{h} is smaller than the crop size {size}; use a smaller crop or drop the image"
        )
    top = int(_rand(generator) * (h - size + 1))
    left = int(_rand(generator) * (w - size + 1))
    out = img[..., top : top + size, left : left + size]
    if _rand(generator) < 0.5:
        out = out.flip(-1)
    if rotate:
        if _rand(generator) < 0.5:
            out = out.flip(-2)
        if _rand(generator) < 0.5:
            out = out.transpose(-1, -2)
    return out.contiguous()
