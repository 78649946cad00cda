"""Self-Adversarial Distillation with Time-Aware Rectification (DESIGN.md section 4), as pure functions.

`model(z, t_cur, z_lq, t_tar)` is the velocity network; times are (B,) tensors; all noise and times
are drawn by the caller (so a step is reproducible per sample, whatever the batch layout).
`sg` (stop-gradient) is `.detach()` or `torch.no_grad()`, exactly where the design puts it.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# The names sad_losses returns, in the order progress lines and summaries show them.
LOSS_TERMS = ("loss", "flow", "cons", "data", "last", "adv", "rect")


@dataclass
class SADConfig:
    lambda_flow: float = 1.0  # conditional flow matching (0 only for the regression baseline)
    lambda_cons: float = 1.0  # shortcut self-consistency
    lambda_data: float = 1.0  # pixel fidelity anchor (MSE + lambda_lpips * LPIPS)
    lambda_lpips: float = 1.0
    # > 1: LPIPS on both images cropped at a random offset in [0, lpips_jitter) px per sample (as E-LPIPS does).
    # AlexNet's first layer has stride 4, like the f=4 codec grid: an aligned LPIPS rewards a fixed 4-px pattern.
    lpips_jitter: int = 0
    lambda_adv: float = 1.0  # fake-trajectory flow matching
    lambda_rect: float = 1.0  # rectification (the DMD-like signal)
    t_sampler: str = "logit-normal"  # p(t) for flow matching: "uniform" | "logit-normal"
    t_mean: float = 0.0
    t_std: float = 1.0
    tar: bool = True  # Time-Aware Rectification weight w(s) = (1-s)^2/s; False = constant 1 (ablation)
    tar_s_min: float = 0.02  # clamp s >= s_min before w(s): w blows up as s -> 0
    tar_w_max: float = 10.0  # and bound w(s) <= w_max (both bounds apply)
    rect_norm: bool = False  # DMD's normaliser: dv as a data-space gap relative to the distance to the real estimate
    # Beyond DESIGN.md: the pixel anchor on the last jump of an N-step sampler run, N drawn per sample from
    # last_steps. The data term trains only the one-step jump, and the multi-step path drifted away from it.
    lambda_last: float = 0.0
    last_steps: tuple[int, ...] = (2, 4)


def _b(t, z):
    """(B,) times -> broadcastable against (B, C, H, W)."""
    return t.view(-1, *([1] * (z.ndim - 1)))


def sample_t(u: torch.Tensor, cfg: SADConfig) -> torch.Tensor:
    """Map uniform draws u in (0,1) to p(t); logit-normal puts more weight on mid times (SD3)."""
    if cfg.t_sampler == "uniform":
        return u
    if cfg.t_sampler == "logit-normal":
        return torch.sigmoid(cfg.t_mean + cfg.t_std * torch.special.ndtri(u.clamp(1e-6, 1 - 1e-6)))
    raise ValueError(f"unknown t_sampler {cfg.t_sampler!r}")


def interpolate(z0, eps, t):
    """z_t = t * eps + (1 - t) * z0."""
    return _b(t, z0) * eps + (1 - _b(t, z0)) * z0


def flow_loss(model, z0, z_lq, eps, t):
    """L_flow = ||v(z_t, t, z_lq, t) - (eps - z0)||^2."""
    return F.mse_loss(model(interpolate(z0, eps, t), t, z_lq, t), eps - z0)


def consistency_loss(model, z_t, t, z_lq, s):
    """Shortcut self-consistency: one jump t->s must match two half jumps through m = (t+s)/2."""
    m = (t + s) / 2
    v1 = model(z_t, t, z_lq, s)
    with torch.no_grad():
        vm = model(z_t, t, z_lq, m)
        z_m = z_t - _b((t - s) / 2, z_t) * vm
        v2 = (vm + model(z_m, m, z_lq, s)) / 2
    return F.mse_loss(v1, v2)


def one_step_fake(model, eps, z_lq):
    """F = v(eps, 1, z_lq, 0), z_fake = eps - F (with gradient)."""
    ones = torch.ones(eps.shape[0], device=eps.device)
    f = model(eps, ones, z_lq, ones * 0)
    return f, eps - f


def last_jump(model, eps, z_lq, n):
    """The output of an n-step sampler run from eps (n: (B,) step counts): the first n - 1 Euler jumps under
    no_grad, the last one, from tau = 1/n, with gradient. One batch mixes step counts: each no_grad forward
    takes only the samples with a jump left before their last, so none pays for another's step count."""
    z, n = eps.clone(), n.to(eps.dtype)
    tau = 1 / n
    with torch.no_grad():
        for i in range(int(n.max()) - 1):
            m = n > i + 1
            t, s = 1 - i / n[m], 1 - (i + 1) / n[m]
            z[m] = z[m] - _b(t - s, z[m]) * model(z[m], t, z_lq[m], s)
    return z - _b(tau, z) * model(z, tau, z_lq, tau * 0)


def data_loss(x_fake, x0, lpips=None, lambda_lpips: float = 1.0, shift=None, jitter: int = 1):
    """Pixel fidelity anchor: MSE(x_fake, x0) + lambda_lpips * LPIPS(x_fake, x0); images in [-1, 1].
    `shift` (B, 2): per-sample offsets in [0, jitter) at which both images are cropped for LPIPS."""
    loss = F.mse_loss(x_fake, x0)
    if lpips is not None and lambda_lpips > 0:
        a, b = (x_fake.clamp(-1, 1) + 1) / 2, (x0 + 1) / 2
        if shift is not None:
            h, w = a.shape[-2] - jitter + 1, a.shape[-1] - jitter + 1
            a, b = (
                torch.stack([x[i, :, dy : dy + h, dx : dx + w] for i, (dy, dx) in enumerate(shift.tolist())])
                for x in (a, b)
            )
        loss = loss + lambda_lpips * lpips(a, b).mean()
    return loss


def adv_loss(model, z_fake, z_lq, t, eps_f):
    """Fake trajectory: flow matching toward sg(z_fake), marked by the negative target time -t."""
    z_fake = z_fake.detach()
    z = interpolate(z_fake, eps_f, t)
    return F.mse_loss(model(z, t, z_lq, -t), eps_f - z_fake)


def tar_weight(s, s_min: float = 0.02, w_max: float = 10.0):
    """w(s) = (1-s)^2 / s with s clamped to >= s_min and w bounded by w_max."""
    s = s.clamp(min=s_min)
    return ((1 - s) ** 2 / s).clamp(max=w_max)


def rect_loss(model, f, z_fake, z_lq, s, eps_r, cfg: SADConfig):
    """L_rect = ||F - sg(F - w(s) dv)||^2, dv = v_fake(z_s) - v_real(z_s) at the re-noised one-step output.

    Its gradient, 2 w(s) dv / numel, moves z_fake = eps - F along +dv: toward the real trajectory's
    data estimate and away from the fake one's.

    With `rect_norm`, dv becomes s dv / mean|z_fake - x0_real| per sample (DMD): s dv = x0_real - x0_fake is
    the gap of the two data estimates, and the mean distance makes it scale-free. Raw dv grows as 1/s for a
    model that predicts x0 (v = (z_s - x0) / s), which made small s dominate and the term diverge.
    """
    with torch.no_grad():
        z_s = interpolate(z_fake.detach(), eps_r, s)
        v_real = model(z_s, s, z_lq, s)
        dv = model(z_s, s, z_lq, -s) - v_real
        if cfg.rect_norm:
            x0_real = z_s - _b(s, z_s) * v_real
            gap = (z_fake.detach() - x0_real).abs().mean(dim=tuple(range(1, dv.ndim)), keepdim=True)
            dv = _b(s, dv) * dv / gap.clamp_min(1e-6)
        if cfg.tar:
            dv = _b(tar_weight(s, cfg.tar_s_min, cfg.tar_w_max), dv) * dv
        target = f.detach() - dv
    return F.mse_loss(f, target)


def sad_losses(
    model, z0, z_lq, draws: dict, cfg: SADConfig, decode=None, x0=None, lpips=None, backward=None, no_sync=nullcontext
) -> dict:
    """Every loss term of one SAD step; returns {name: scalar}, with the weighted sum under "loss".

    draws: eps, t, s_cons, eps_one, t_adv, eps_adv, s_rect, eps_rect, n_last (per-sample noise, times, steps).
    With `backward(loss)`, each graph is back-propagated as soon as its terms exist and then freed
    (flow; cons; data + rect, which share the one-step graph; last; adv): the same gradient as one backward
    of the sum, at the peak memory of one graph instead of four. Every graph but the last is built and
    back-propagated under `no_sync()`, so DDP reduces the summed gradient once. Returned values are
    then detached.
    """
    eps, t = draws["eps"], draws["t"]
    shift = draws["lpips_shift"] if cfg.lpips_jitter > 1 else None
    one_step = max(cfg.lambda_data, cfg.lambda_rect) > 0
    fake = {}

    def flow():
        return {"flow": (cfg.lambda_flow, flow_loss(model, z0, z_lq, eps, t))}

    def cons():
        return {"cons": (cfg.lambda_cons, consistency_loss(model, interpolate(z0, eps, t), t, z_lq, draws["s_cons"]))}

    def data_rect():
        f, z_fake = one_step_fake(model, draws["eps_one"], z_lq)
        fake["z"] = z_fake.detach()
        terms = {}
        if cfg.lambda_data > 0:
            terms["data"] = (
                cfg.lambda_data,
                data_loss(decode(z_fake), x0, lpips, cfg.lambda_lpips, shift, cfg.lpips_jitter),
            )
        if cfg.lambda_rect > 0:
            terms["rect"] = (
                cfg.lambda_rect,
                rect_loss(model, f, z_fake, z_lq, draws["s_rect"], draws["eps_rect"], cfg),
            )
        return terms

    def last():
        x_last = decode(last_jump(model, draws["eps_one"], z_lq, draws["n_last"]))
        return {"last": (cfg.lambda_last, data_loss(x_last, x0, lpips, cfg.lambda_lpips, shift, cfg.lpips_jitter))}

    def adv():
        if "z" not in fake:  # no data/rect term: the one-step output is only a target
            with torch.no_grad():
                fake["z"] = one_step_fake(model, draws["eps_one"], z_lq)[1]
        return {"adv": (cfg.lambda_adv, adv_loss(model, fake["z"], z_lq, draws["t_adv"], draws["eps_adv"]))}

    groups = (
        [flow] * (cfg.lambda_flow > 0)
        + [cons] * (cfg.lambda_cons > 0)
        + [data_rect] * one_step
        + [last] * (cfg.lambda_last > 0)
        + [adv] * (cfg.lambda_adv > 0)
    )
    out, loss = {}, 0.0
    for i, group in enumerate(groups):
        with no_sync() if backward is not None and i < len(groups) - 1 else nullcontext():
            terms = group()
            weighted = sum(w * v for w, v in terms.values())
            if backward is not None:
                backward(weighted)
                weighted, terms = weighted.detach(), {k: (w, v.detach()) for k, (w, v) in terms.items()}
        out.update({k: v for k, (_, v) in terms.items()})
        loss = loss + weighted
    out["loss"] = loss
    return out


def draw_sample(shape, cfg: SADConfig, generator: torch.Generator) -> dict:
    """All noise and times one training sample needs, drawn in a fixed order from its own generator."""

    def u():
        return torch.rand((), generator=generator)

    d = {"eps": torch.randn(shape, generator=generator), "t": sample_t(u(), cfg)}
    d["s_cons"] = u() * d["t"]  # s ~ U(0, t)
    d["eps_one"] = torch.randn(shape, generator=generator)
    d["t_adv"] = u().clamp(1e-3, 1)  # t' ~ U(0, 1)
    d["eps_adv"] = torch.randn(shape, generator=generator)
    d["s_rect"] = u().clamp(1e-3, 1)  # s ~ U(0, 1)
    d["eps_rect"] = torch.randn(shape, generator=generator)
    d["lpips_shift"] = torch.randint(
        0, max(cfg.lpips_jitter, 1), (2,), generator=generator
    )  # these two last: the rest stays as before
    d["n_last"] = torch.tensor(cfg.last_steps)[torch.randint(0, len(cfg.last_steps), (), generator=generator)]
    return d
