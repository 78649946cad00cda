"""Where the work runs: the device, the CPU's threads and what its hardware multiplies natively. Shared by the
pipeline and the trainer."""

from __future__ import annotations

import torch

from teasr_cli.errors import TeasrError


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise TeasrError(f"--device {device} asked for, but PyTorch sees no CUDA GPU; use --device cpu or auto")
    if device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise TeasrError(
            "--device mps asked for, but this PyTorch has no MPS (Apple GPU) support; use --device cpu or auto"
        )
    if device not in ("cpu", "cuda", "mps") and not device.startswith("cuda:"):
        raise TeasrError(f"unknown device {device!r}; use auto, cpu, cuda, cuda:N or mps")
    return torch.device(device)


def cpu_multiplies_bf16() -> bool:
    """Whether this CPU has AMX tiles (Intel Xeon 4th gen and later), which multiply bf16 natively: there the
    tiny-cpu model upscales about 1.9x as fast in bf16 at the same quality (benchmarks/README.md). Elsewhere
    bf16 is emulated and slower than fp32. torch.cpu.get_capabilities is public in recent torch (older builds
    lack it and answer no: fp32 is never the wrong choice); get_cpu_capability() names vector widths, not AMX."""
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    return bool(capabilities and capabilities().get("amx_tile", False))


def set_threads(threads: int | None) -> None:
    """Intra-op threads for this process (None or 0: torch's default, one per core)."""
    if threads:
        torch.set_num_threads(threads)
