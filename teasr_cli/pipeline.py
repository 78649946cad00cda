"""Upscaler: image -> bicubic x4 -> encode -> any-step sampling (tiled) -> decode -> anchor / colour fix /
fidelity projection -> image."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from teasr_cli.backbones.qwen_image import OFFLOAD_MODES, enable_offload
from teasr_cli.codecs import build_codec, encode_lq
from teasr_cli.degrade import downscale
from teasr_cli.errors import TeasrError
from teasr_cli.folders import load_pretrained
from teasr_cli.hub import resolve_model
from teasr_cli.imageio import from_pil, replace_pixels, to_pil
from teasr_cli.runtime import cpu_multiplies_bf16, pick_device, set_threads
from teasr_cli.sampler import sample
from teasr_cli.tiling import TiledVelocity, tile_starts

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COLOR_FIXES = ("wavelet", "adain", "none")


def _gaussian_blur(x, sigma: float):
    k = int(2 * round(3 * sigma) + 1)
    ax = torch.arange(k, dtype=x.dtype, device=x.device) - k // 2
    g = torch.exp(-(ax**2) / (2 * sigma**2))
    g = (g / g.sum()).view(1, 1, 1, k).repeat(x.shape[1], 1, 1, 1)
    pad = "reflect" if min(x.shape[-2:]) > k // 2 else "replicate"
    x = F.conv2d(F.pad(x, (k // 2, k // 2, 0, 0), mode=pad), g, groups=x.shape[1])
    return F.conv2d(F.pad(x, (0, 0, k // 2, k // 2), mode=pad), g.transpose(2, 3), groups=x.shape[1])


def wavelet_color_fix_(out, lq, scale: int, sigma: float = 4.0):
    """In place: swap the output's low-frequency band for the input's (StableSR's wavelet colour fix).

    Removes the slow colour drift a generative model can add without touching detail. The band is far
    below the LQ Nyquist frequency, so it is computed at LQ resolution (the output area-downscaled),
    which keeps the extra memory to one output-sized temporary.
    """
    small = F.avg_pool2d(out, scale) if scale > 1 else out
    diff = _gaussian_blur(lq, sigma) - _gaussian_blur(small, sigma)
    return out.add_(F.interpolate(diff, size=out.shape[-2:], mode="bilinear", align_corners=False))


def adain_color_fix_(out, ref, eps: float = 1e-5):
    """In place: match each channel's mean and std to the reference (e.g. the LQ image)."""
    mo, so = out.mean((2, 3), keepdim=True), out.std((2, 3), keepdim=True)
    mr, sr = ref.mean((2, 3), keepdim=True), ref.std((2, 3), keepdim=True)
    return out.sub_(mo).mul_(sr / (so + eps)).add_(mr)


def auto_tile(latent_hw: tuple[int, int], patch: int, device: torch.device) -> int:
    """Largest square latent tile whose token count stays within a budget that fits the memory here.

    Attention grows with tokens squared, so the budget (tokens per branch) is what bounds the peak. On a CPU
    attention also dominates the time: measured on an idle 2-core machine with the tiny-cpu model, a 512x512
    input takes 25 s in 64x64-token tiles, 7.3 s in 32x32 and 6.2 s in 16x16 (despite the recomputed quarter
    overlap), so the CPU budget is 16x16 tokens, which is still more context than the 12x12-token training crops.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        tokens = 4096 if free > 16 * 2**30 else 2048
    else:
        tokens = 256
    side = int(tokens**0.5) * patch
    return max(min(side, max(latent_hw)), 2 * patch)  # a latent smaller than 2 patches still gets a valid (single) tile


def project_to_lr_(out, lr, scale: int, iters: int = 5):
    """In place: iterative back-projection onto {x : downscale(x) = lr}.

    The range/null-space split of DDNM for a known downscale: what the LR grid can see of `out` is
    replaced by `lr`, what it cannot see (the detail above the LR Nyquist frequency) is kept. From a
    model's output five rounds bring downscale(out) to ~66 dB PSNR against `lr` (from ~38).
    """
    for _ in range(iters):
        out.add_(F.interpolate(lr - downscale(out, scale), size=out.shape[-2:], mode="bicubic", align_corners=False))
    return out


@dataclass
class UpscaleSettings:
    steps: int = 1
    seed: int = 0
    tile: int | None = None  # latent pixels; None = auto
    tile_overlap: int | None = None  # latent pixels; None = tile // 4
    tile_batch: int | None = None  # tiles per model call; None = auto (4 on a CPU: bigger matmuls, 1 on a GPU)
    color_fix: str = "wavelet"
    grid_shift: bool = True  # move the patch grid by half a patch on every other step (steps > 1)
    # steps > 1: what the LR grid can see comes from the 1-step result (one more model call), the finer detail
    # from the N steps. The N-step samples drift at LR scale, which costs fidelity and LPIPS (train/README.md).
    anchor: bool = True
    # for clean inputs (downscaled, not blurred, noisy or compressed): 0 = off; F > 0 keeps a fraction 1 - F of
    # the detail the model adds over bicubic and projects the result onto the input (downscale(out) = input)
    fidelity: float = 0.0

    @property
    def anchored(self) -> bool:
        """Whether a 1-step anchor pass runs before the N steps (the fidelity projection replaces the same band)."""
        return self.anchor and self.steps > 1 and not self.fidelity


class Upscaler:
    """x4 upscaler around a velocity model `v = model(z_t, t_cur, z_lq, t_tar)` and a latent codec.

    >>> up = Upscaler.from_pretrained()            # embedded model; or a folder / "org/name@rev"
    >>> sr = up(Image.open("photo.jpg"), steps=4, seed=0)
    """

    def __init__(
        self,
        model,
        codec,
        scale: int = 4,
        device: str | torch.device = "cpu",
        dtype: str = "auto",
        offload: str = "none",
    ):
        big = hasattr(model, "offload_mode")  # a Hub-base backbone (Qwen-Image): bf16, offload hooks
        self.device = pick_device(device) if isinstance(device, str) else device
        if dtype == "auto":
            dtype = "bf16" if big or (self.device.type == "cpu" and cpu_multiplies_bf16()) else "fp32"
        if dtype not in DTYPES:
            raise TeasrError(f"unknown dtype {dtype!r}; use auto or one of {', '.join(DTYPES)}")
        if offload not in OFFLOAD_MODES:
            raise TeasrError(f"unknown offload mode {offload!r}; use one of {', '.join(OFFLOAD_MODES)}")
        if offload != "none" and not big:
            raise TeasrError("--offload is for big backbones (qwen-image); this model fits in memory as it is")
        self.dtype_name, self.dtype = dtype, DTYPES[dtype]  # the name: what "auto" chose, for the records
        if big:
            model.to(self.dtype)  # cast first: the offload hooks pin where each module lives
            codec.to(self.dtype)
            enable_offload(model, offload, self.device)
            self.model = model.eval()
        else:
            self.model = model.to(self.device, self.dtype).eval()
        self.codec = codec.to(self.device)
        self.scale = scale
        self.patch = getattr(getattr(model, "config", None), "patch_size", 1)

    @classmethod
    def from_pretrained(
        cls,
        spec=None,
        device: str = "auto",
        dtype: str = "auto",
        threads: int | None = None,
        progress: bool = True,
        offload: str = "none",
        revision: str | None = None,
    ) -> "Upscaler":
        if revision is not None:  # huggingface_hub's keyword, beside the "org/name@revision" spelling
            if spec is None or "@" in str(spec):
                raise TeasrError(f"revision={revision!r} needs a Hub repo id without '@revision' of its own")
            spec = f"{spec}@{revision}"
        set_threads(threads)
        folder = resolve_model(spec, progress=progress)
        model, config = load_pretrained(folder)
        codec = getattr(model, "codec", None) or build_codec(config.get("codec", {}))
        up = cls(model, codec, scale=config.get("scale", 4), device=device, dtype=dtype, offload=offload)
        up.config, up.folder = config, folder
        return up

    def _velocity(self, z, t_cur, z_lq, t_tar, steps: int = 1):
        """One (tile's) model call. With large patches each token's pixels come out of one linear map, so the
        patch grid shows; on odd steps (of a multi-step run) the grid is moved by half a patch, by padding the
        tile on its top/left, so the grid lines of successive steps do not add up."""
        shift = self.patch // 2 if steps > 1 and round((1 - float(t_cur)) * steps) % 2 else 0
        if shift:
            z, z_lq = (F.pad(x, (shift, 0, shift, 0), mode="replicate") for x in (z, z_lq))
        v = self.model(z.to(self.dtype), t_cur, z_lq.to(self.dtype), t_tar).float()
        return v[..., shift:, shift:]

    @torch.no_grad()
    def upscale_tensor(
        self,
        lq: torch.Tensor,
        settings: UpscaleSettings | None = None,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        tile_callback: Callable[[int, int], None] | None = None,
    ) -> torch.Tensor:
        """lq: (1, 3, h, w) RGB in [0, 1] -> (1, 3, scale*h, scale*w) in [0, 1].

        callback(i, n, z) follows each sampling step; tile_callback(done, total) each model call, counted in
        tiles over the whole run (anchor pass included), so a big photo's progress moves and can be stopped
        between tiles (an exception raised by either callback ends the run).
        """
        s = settings or UpscaleSettings()
        if s.color_fix not in COLOR_FIXES:
            raise TeasrError(f"unknown colour fix {s.color_fix!r}; use one of {', '.join(COLOR_FIXES)}")
        if s.steps < 1:
            raise TeasrError("--steps must be at least 1")
        if not 0 <= s.fidelity <= 1:
            raise TeasrError(f"--fidelity must be between 0 and 1, not {s.fidelity}")
        h, w = lq.shape[-2:]
        # pad so the x4 image is a whole number of latent pixels; reflect keeps borders natural
        m = max(1, -(-self.codec.downsample // self.scale))
        ph, pw = (-h) % m, (-w) % m
        x = lq.to(self.device, torch.float32) * 2 - 1
        if ph or pw:
            x = F.pad(x, (0, pw, 0, ph), mode="reflect" if min(h, w) > max(ph, pw) else "replicate")
        # memory: every output-sized tensor of a big photo is large, so keep as few alive as possible
        z_lq = encode_lq(self.codec, x, self.scale).float()
        Hl, Wl = z_lq.shape[-2:]
        _, _, tile, overlap = self.layout(h, w, s)
        n_calls = self.work(h, w, s)
        if tile < 2 * self.patch:
            raise TeasrError(f"--tile {tile} is too small; use at least {2 * self.patch} (latent pixels)")

        done = 0

        def counted(z, t_cur, z_lq, t_tar, steps):
            nonlocal done
            v = self._velocity(z, t_cur, z_lq, t_tar, steps)
            if tile_callback is not None:
                done += z.shape[0] // lq.shape[0]  # tiles in this model call
                tile_callback(done, n_calls)
            return v

        def velocity(steps):
            return TiledVelocity(
                partial(counted, steps=steps if s.grid_shift else 1),
                tile,
                min(overlap, tile - 1),
                s.tile_batch or (4 if self.device.type == "cpu" else 1),
                align=self.patch,
            )

        # one full-size noise tensor from a CPU generator: the same seed gives the same image on any device
        noise = torch.randn(z_lq.shape, generator=torch.Generator().manual_seed(s.seed)).to(self.device)
        anchor = s.anchored
        total = s.steps + anchor
        try:
            if anchor:  # only its LR-sized downscale is kept
                z = sample(velocity(1), noise, z_lq, 1, callback=callback and (lambda i, n, z: callback(1, total, z)))
                lr_anchor = downscale(self.codec.decode(z).float(), self.scale)
                del z
            z = sample(
                velocity(s.steps),
                noise,
                z_lq,
                s.steps,
                callback=callback and (lambda i, n, z: callback(i + anchor, total, z)),
            )
        except torch.OutOfMemoryError:
            raise TeasrError(
                f"out of memory with --tile {tile}; try a smaller --tile (e.g. {max(tile // 2, 2 * self.patch)})"
            ) from None
        del z_lq, noise
        out = self.codec.decode(z).float()
        del z
        if anchor:
            project_to_lr_(out, lr_anchor, self.scale)
        if s.color_fix == "wavelet":
            wavelet_color_fix_(out, x, self.scale)
        elif s.color_fix == "adain":
            adain_color_fix_(out, x)
        if s.fidelity:
            base = F.interpolate(x, size=out.shape[-2:], mode="bicubic", align_corners=False)
            out = project_to_lr_(base.lerp_(out, 1 - s.fidelity), x, self.scale)
        out = out[..., : h * self.scale, : w * self.scale]
        return out.clamp_(-1, 1).add_(1).mul_(0.5).cpu()

    def layout(self, h: int, w: int, s: UpscaleSettings) -> tuple[int, int, int, int]:
        """(latent height, latent width, tile, tile overlap) for an h x w input."""
        m = max(1, -(-self.codec.downsample // self.scale))  # the input is padded to a multiple of m
        Hl, Wl = ((n + (-n) % m) * self.scale // self.codec.downsample for n in (h, w))
        tile = s.tile or auto_tile((Hl, Wl), self.patch, self.device)
        overlap = s.tile_overlap if s.tile_overlap is not None else tile // 4
        return Hl, Wl, tile, min(overlap, tile - 1)

    def work(self, h: int, w: int, settings: UpscaleSettings | None = None) -> int:
        """Model calls, in tiles over every pass (the anchor pass included), that an h x w input takes: the total
        tile_callback counts up to, known before any work so a progress bar can show it (and an ETA) at once."""
        s = settings or UpscaleSettings()
        Hl, Wl, tile, overlap = self.layout(h, w, s)
        per_pass = len(tile_starts(Hl, min(tile, Hl), overlap, self.patch)) * len(
            tile_starts(Wl, min(tile, Wl), overlap, self.patch)
        )
        return per_pass * (s.steps + s.anchored)

    def upscale_picture(self, pic, settings: UpscaleSettings | None = None, callback=None, tile_callback=None):
        """imageio.Picture in, Picture out (alpha, grayscale, 16-bit and metadata carried along)."""
        rgb = self.upscale_tensor(pic.rgb.unsqueeze(0), settings, callback, tile_callback)[0]
        return replace_pixels(pic, rgb)

    def __call__(self, image, steps: int = 1, seed: int = 0, callback=None, **kwargs):
        """PIL image in, PIL image out (x4)."""
        settings = UpscaleSettings(steps=steps, seed=seed, **kwargs)
        return to_pil(self.upscale_picture(from_pil(image), settings, callback))
