"""Any-step Euler sampler (DESIGN.md section 5, the paper's Algorithm 1)."""

from __future__ import annotations

from typing import Callable

import torch


def timesteps(steps: int) -> list[float]:
    """tau_i = 1 - i/N, i = 0..N."""
    if steps < 1:
        raise ValueError("steps must be >= 1")
    return [1.0 - i / steps for i in range(steps + 1)]


@torch.no_grad()
def sample(
    velocity: Callable,
    noise: torch.Tensor,
    z_lq: torch.Tensor,
    steps: int,
    callback: Callable[[int, int, torch.Tensor], None] | None = None,
) -> torch.Tensor:
    """Integrate from pure noise (t=1) to data (t=0) in `steps` Euler jumps.

    `velocity(z, t_cur, z_lq, t_tar)` is the model (or a tiled wrapper of it); each call is told
    where the step lands (t_tar), which is what makes one model exact at any step count.
    `callback(i, steps, z)` is called after every step (progress bars, previews).
    """
    taus = timesteps(steps)
    z = noise
    for i in range(steps):
        v = velocity(z, taus[i], z_lq, taus[i + 1])
        z = torch.sub(z, v.to(z.dtype), alpha=taus[i] - taus[i + 1])  # no temporary: big images are memory-bound
        if callback is not None:
            callback(i + 1, steps, z)
    return z
