"""SAD + TAR losses (teasr_cli/sad.py) against hand computations on a tiny analytic velocity model.

The stand-in model is v(z, t, z_lq, s) = a z + b z_lq + c t + d s with learnable scalars, so every loss
and every gradient below has a closed form that the test writes out independently of sad.py.
"""

import pytest
import torch
from scipy.stats import norm

from teasr_cli.model import DiTConfig, TeasrDiT
from teasr_cli.sad import (
    SADConfig,
    adv_loss,
    consistency_loss,
    data_loss,
    draw_sample,
    flow_loss,
    last_jump,
    one_step_fake,
    rect_loss,
    sad_losses,
    sample_t,
    tar_weight,
)

SHAPE = (2, 3, 2, 2)
A, B, C, D = 0.7, -0.3, 0.5, 0.9


class Linear(torch.nn.Module):
    """v = a z + b z_lq + c t + d s (times broadcast per sample); records every call."""

    def __init__(self, a=A, b=B, c=C, d=D):
        super().__init__()
        self.a, self.b, self.c, self.d = (torch.nn.Parameter(torch.tensor(x)) for x in (a, b, c, d))
        self.calls = []

    def forward(self, z, t, zl, s):
        self.calls.append((t.detach().clone(), s.detach().clone()))
        return self.a * z + self.b * zl + self.c * t.view(-1, 1, 1, 1) + self.d * s.view(-1, 1, 1, 1)


def hand_v(z, t, zl, s, a=A, b=B, c=C, d=D):
    return a * z + b * zl + c * t.view(-1, 1, 1, 1) + d * s.view(-1, 1, 1, 1)


def tensors(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g) for _ in range(n)]


def mse(x, y):
    return ((x - y) ** 2).sum().item() / x.numel()


def test_flow_loss_matches_hand_computation_and_gradient():
    z0, zl, eps, _ = tensors()
    t = torch.tensor([0.25, 0.8])
    m = Linear()
    loss = flow_loss(m, z0, zl, eps, t)
    zt = t.view(-1, 1, 1, 1) * eps + (1 - t.view(-1, 1, 1, 1)) * z0
    r = hand_v(zt, t, zl, t) - (eps - z0)
    assert loss.item() == pytest.approx((r**2).mean().item(), rel=1e-6)
    loss.backward()
    # d/da mean(r^2) = mean(2 r z_t); d/dd = mean(2 r t)
    assert m.a.grad.item() == pytest.approx((2 * r * zt).mean().item(), rel=1e-5)
    assert m.d.grad.item() == pytest.approx((2 * r * t.view(-1, 1, 1, 1)).mean().item(), rel=1e-5)
    assert [(tc.tolist(), s.tolist()) for tc, s in m.calls] == [(t.tolist(), t.tolist())]  # target time = t


def test_consistency_loss_two_half_steps_and_no_gradient_through_v2():
    _, zl, zt, _ = tensors(1)
    t, s = torch.tensor([0.9, 0.6]), torch.tensor([0.1, 0.3])
    zt = zt.requires_grad_(True)
    m = Linear()
    loss = consistency_loss(m, zt, t, zl, s)
    mid = (t + s) / 2
    x = zt.detach()
    v1 = hand_v(x, t, zl, s)
    vm = hand_v(x, t, zl, mid)
    zm = x - ((t - s) / 2).view(-1, 1, 1, 1) * vm
    v2 = (vm + hand_v(zm, mid, zl, s)) / 2
    assert loss.item() == pytest.approx(mse(v1, v2), rel=1e-6)
    loss.backward()
    r = 2 * (v1 - v2) / v1.numel()
    # gradients only through v1: d/dz_t = r * a, d/da = sum(r z_t), d/dd = sum(r s), d/dc = sum(r t)
    torch.testing.assert_close(zt.grad, r * A)
    assert m.a.grad.item() == pytest.approx((r * x).sum().item(), rel=1e-5)
    assert m.d.grad.item() == pytest.approx((r * s.view(-1, 1, 1, 1)).sum().item(), rel=1e-5)
    assert m.c.grad.item() == pytest.approx((r * t.view(-1, 1, 1, 1)).sum().item(), rel=1e-5)


def test_one_step_fake_uses_t_cur_1_and_t_tar_0():
    _, zl, eps, _ = tensors(2)
    eps = eps.requires_grad_(True)
    m = Linear()
    f, z_fake = one_step_fake(m, eps, zl)
    ones = torch.ones(2)
    torch.testing.assert_close(f, hand_v(eps.detach(), ones, zl, ones * 0))
    torch.testing.assert_close(z_fake, eps.detach() - f)
    assert [(tc.tolist(), s.tolist()) for tc, s in m.calls] == [([1.0, 1.0], [0.0, 0.0])]
    assert z_fake.requires_grad  # the one-step output carries gradient to the model
    z_fake.sum().backward()
    assert m.b.grad.item() == pytest.approx(-zl.sum().item(), rel=1e-5)


def test_data_loss_mse_plus_weighted_lpips_on_01_images():
    g = torch.Generator().manual_seed(3)
    x0 = torch.rand(2, 3, 4, 4, generator=g) * 2 - 1
    x_fake = torch.randn(2, 3, 4, 4, generator=g) * 1.5  # some values outside [-1, 1]
    seen = []

    def stub(x, y):  # a per-image L1 "perceptual" distance; records what it was given
        seen.append((x, y))
        return (x - y).abs().mean((1, 2, 3))

    want_mse = mse(x_fake, x0)
    xf01, x001 = (x_fake.clamp(-1, 1) + 1) / 2, (x0 + 1) / 2
    want_lp = (xf01 - x001).abs().mean().item()
    assert data_loss(x_fake, x0).item() == pytest.approx(want_mse, rel=1e-6)
    assert data_loss(x_fake, x0, stub, 0.5).item() == pytest.approx(want_mse + 0.5 * want_lp, rel=1e-6)
    x, y = seen[0]
    assert x.min() >= 0 and x.max() <= 1 and y.min() >= 0 and y.max() <= 1  # LPIPS takes [0, 1] images
    seen.clear()
    assert data_loss(x_fake, x0, stub, 0.0).item() == pytest.approx(want_mse, rel=1e-6)
    assert not seen  # lambda 0: LPIPS not even run


def test_data_loss_jitter_crops_both_images_at_each_samples_offset():
    """E-LPIPS-style jitter: LPIPS sees both images cropped at the same per-sample offset; MSE sees them whole."""
    g = torch.Generator().manual_seed(4)
    x0, x_fake = torch.rand(2, 3, 8, 8, generator=g) * 2 - 1, torch.rand(2, 3, 8, 8, generator=g) * 2 - 1
    seen = []
    stub = lambda x, y: seen.append((x, y)) or (x - y).abs().mean((1, 2, 3))  # noqa: E731
    shift = torch.tensor([[0, 3], [2, 1]])
    got = data_loss(x_fake, x0, stub, 1.0, shift, jitter=4)
    x, y = seen[0]
    assert x.shape == y.shape == (2, 3, 5, 5)
    for i, (dy, dx) in enumerate(shift.tolist()):
        torch.testing.assert_close(y[i], (x0[i, :, dy : dy + 5, dx : dx + 5] + 1) / 2)
        torch.testing.assert_close(x[i], (x_fake[i, :, dy : dy + 5, dx : dx + 5] + 1) / 2)
    assert got.item() == pytest.approx(mse(x_fake, x0) + (x - y).abs().mean().item(), rel=1e-6)
    # a pattern of period 4 is one image to an unjittered stride-4 probe and four images to a jittered one
    stripes = -torch.ones(1, 3, 8, 8)  # images in [-1, 1]: black with white columns 0 and 4
    stripes[..., ::4] = 1.0
    probe = lambda x, y: x[..., ::4].mean((1, 2, 3))  # noqa: E731  (a stride-4 sampler, like AlexNet's first conv)
    seen_offsets = {
        round(data_loss(stripes, stripes, probe, 1.0, torch.tensor([[0, k]]), jitter=4).item(), 3) for k in range(4)
    }
    assert seen_offsets == {0.0, 1.0}


def test_adv_loss_negative_target_time_and_stop_gradient_on_z_fake():
    _, zl, zf, eps_f = tensors(4)
    t = torch.tensor([0.3, 0.7])
    z_fake = zf.clone().requires_grad_(True)
    m = Linear()
    loss = adv_loss(m, z_fake, zl, t, eps_f)
    zp = t.view(-1, 1, 1, 1) * eps_f + (1 - t.view(-1, 1, 1, 1)) * zf
    assert loss.item() == pytest.approx(mse(hand_v(zp, t, zl, -t), eps_f - zf), rel=1e-6)
    assert [(tc.tolist(), s.tolist()) for tc, s in m.calls] == [(t.tolist(), (-t).tolist())]
    loss.backward()
    assert z_fake.grad is None  # sg(z_fake): the fake trajectory does not move the one-step output
    assert m.a.grad is not None and m.a.grad.abs() > 0


@pytest.mark.parametrize("tar", [True, False])
def test_rect_loss_gradient_is_2_w_dv_over_numel(tar):
    _, zl, eps, eps_r = tensors(5)
    s = torch.tensor([0.25, 0.5])
    m = Linear()
    f, z_fake = one_step_fake(m, eps, zl)
    f_leaf = f.detach().clone().requires_grad_(True)
    zf_leaf = z_fake.detach().clone().requires_grad_(True)
    cfg = SADConfig(tar=tar)
    loss = rect_loss(m, f_leaf, zf_leaf, zl, s, eps_r, cfg)
    # for this model v(z, s, zl, -s) - v(z, s, zl, s) = -2 d s whatever z is
    w = torch.tensor([2.25, 0.5]) if tar else torch.ones(2)  # (1-s)^2/s at s = 1/4 and 1/2
    dv = (w * -2 * D * s).view(-1, 1, 1, 1).expand(SHAPE)
    assert loss.item() == pytest.approx((dv**2).mean().item(), rel=1e-6)  # ||F - (F - dv)||^2
    loss.backward()
    torch.testing.assert_close(f_leaf.grad, 2 * dv / f.numel())
    assert zf_leaf.grad is None  # the re-noised point is built from sg(z_fake)
    assert m.d.grad is None or m.d.grad == 0  # the two velocity evaluations are under no_grad


def test_rect_norm_is_the_data_estimate_gap_over_the_mean_distance():
    _, zl, eps, eps_r = tensors(7)
    s = torch.tensor([0.25, 0.5])
    m = Linear()
    f = one_step_fake(m, eps, zl)[0].detach().requires_grad_(True)
    z_fake = eps - f.detach()
    cfg = SADConfig(tar=False, rect_norm=True)
    rect_loss(m, f, z_fake, zl, s, eps_r, cfg).backward()
    with torch.no_grad():
        b = s.view(-1, 1, 1, 1)
        zs = b * eps_r + (1 - b) * z_fake
        x0_real, x0_fake = zs - b * m(zs, s, zl, s), zs - b * m(zs, s, zl, -s)
        dv = (x0_real - x0_fake) / (z_fake - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True)
    torch.testing.assert_close(f.grad, 2 * dv / f.numel())


def test_rect_loss_step_moves_z_fake_from_fake_toward_real_data_estimate():
    """Gradient descent on F moves z_fake = eps - F along x0_real - x0_fake (data estimates at z_s)."""
    _, zl, eps, eps_r = tensors(6)
    s = torch.tensor([0.5, 0.8])
    m = Linear(a=0.4, b=0.2, c=-0.3, d=0.6)
    f = one_step_fake(m, eps, zl)[0].detach().requires_grad_(True)
    z_fake = eps - f.detach()
    rect_loss(m, f, z_fake, zl, s, eps_r, SADConfig()).backward()
    with torch.no_grad():
        zs = s.view(-1, 1, 1, 1) * eps_r + (1 - s.view(-1, 1, 1, 1)) * z_fake
        x0_real = zs - s.view(-1, 1, 1, 1) * m(zs, s, zl, s)  # data estimate of the real trajectory
        x0_fake = zs - s.view(-1, 1, 1, 1) * m(zs, s, zl, -s)  # ... and of the fake one
    step = f.grad  # SGD: dF = -lr grad, so dz_fake = -dF = +lr grad
    cos = torch.nn.functional.cosine_similarity(step.flatten(1), (x0_real - x0_fake).flatten(1))
    torch.testing.assert_close(cos, torch.ones(2))


def test_tar_weight_values_and_clamps():
    s = torch.tensor([0.5, 0.25, 0.1, 1.0])
    torch.testing.assert_close(tar_weight(s), torch.tensor([0.5, 2.25, 8.1, 0.0]))
    # w_max bound: (1-0.05)^2/0.05 = 18.05 -> 10; s_min clamp: s = 0.001 -> 0.02 -> 48.02 (under w_max = 100)
    assert tar_weight(torch.tensor([0.05])).item() == pytest.approx(10.0)
    assert tar_weight(torch.tensor([0.001]), s_min=0.02, w_max=100).item() == pytest.approx(0.98**2 / 0.02, rel=1e-6)
    assert tar_weight(torch.tensor([0.0]), s_min=0.5, w_max=100).item() == pytest.approx(0.5)
    w = tar_weight(torch.linspace(0, 1, 101))
    assert torch.all(w[1:] <= w[:-1]) and torch.isfinite(w).all()  # monotone, finite at s = 0


def test_sample_t_uniform_and_logit_normal():
    u = torch.rand(10000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sample_t(u, SADConfig(t_sampler="uniform")), u)
    t = sample_t(u, SADConfig())
    assert t.min() > 0 and t.max() < 1
    assert t.median().item() == pytest.approx(0.5, abs=0.02)
    assert sample_t(torch.tensor([0.5]), SADConfig()).item() == pytest.approx(0.5, abs=1e-6)
    # the quantile function is sigmoid(mean + std * Phi^-1(u))
    q = torch.tensor([0.1, 0.3, 0.9], dtype=torch.float64)
    cfg = SADConfig(t_mean=0.5, t_std=2.0)
    want = 1 / (1 + torch.exp(-(0.5 + 2.0 * torch.from_numpy(norm.ppf(q.numpy())))))
    torch.testing.assert_close(sample_t(q, cfg), want)
    with pytest.raises(ValueError):
        sample_t(u, SADConfig(t_sampler="beta"))


def _draws(seed=0, shape=SHAPE[1:]):
    return {
        k: torch.stack([v0, v1])
        for (k, v0), v1 in zip(
            draw_sample(shape, SADConfig(), torch.Generator().manual_seed(seed)).items(),
            draw_sample(shape, SADConfig(), torch.Generator().manual_seed(seed + 1)).values(),
        )
    }


def test_sad_losses_flow_only_equals_flow_loss():
    z0, zl, *_ = tensors(7)
    d = _draws()
    off = SADConfig(lambda_cons=0, lambda_data=0, lambda_adv=0, lambda_rect=0)
    m = Linear()
    out = sad_losses(m, z0, zl, d, off)
    assert set(out) == {"flow", "loss"}
    assert out["loss"].item() == flow_loss(m, z0, zl, d["eps"], d["t"]).item()


def test_sad_losses_weighted_sum_of_all_terms():
    z0, zl, *_ = tensors(8)
    d = _draws(3)
    x0 = z0.tanh()  # "images" for a codec whose decoder doubles the latent
    cfg = SADConfig(lambda_cons=0.5, lambda_data=2.0, lambda_adv=0.25, lambda_rect=3.0)
    out = sad_losses(Linear(), z0, zl, d, cfg, decode=lambda z: 2 * z, x0=x0)
    assert set(out) == {"flow", "cons", "data", "adv", "rect", "loss"}
    want = out["flow"] + 0.5 * out["cons"] + 2.0 * out["data"] + 0.25 * out["adv"] + 3.0 * out["rect"]
    assert out["loss"].item() == pytest.approx(want.item(), rel=1e-6)
    # spot-check one term against its own function: the data term is the MSE of the decoded one-step output
    m = Linear()
    _, z_fake = one_step_fake(m, d["eps_one"], zl)
    assert out["data"].item() == pytest.approx(mse(2 * z_fake, x0), rel=1e-5)


def test_sad_losses_backward_on_real_dit():
    """The whole SAD step differentiates through the real model, with finite gradients on every weight."""
    torch.manual_seed(0)
    model = TeasrDiT(DiTConfig(hidden_size=32, depth=1, num_heads=2)).train()
    with torch.no_grad():  # adaLN-Zero starts as a zero map: perturb so every weight matters
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    g = torch.Generator().manual_seed(0)
    z0, zl = torch.randn(2, 48, 4, 4, generator=g), torch.randn(2, 48, 4, 4, generator=g)
    d = {
        k: torch.stack([v0, v1])
        for (k, v0), v1 in zip(
            draw_sample((48, 4, 4), SADConfig(), g).items(), draw_sample((48, 4, 4), SADConfig(), g).values()
        )
    }
    out = sad_losses(
        model,
        z0,
        zl,
        d,
        SADConfig(),
        decode=lambda z: torch.pixel_shuffle(z, 4),
        x0=torch.pixel_shuffle(z0, 4).clamp(-1, 1),
    )
    out["loss"].backward()
    grads = [p.grad for p in model.parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert all(torch.isfinite(v) for v in out.values())


def test_per_graph_backward_equals_one_backward_of_the_sum():
    """backward= gives the gradient of out["loss"], graph by graph; all but the last under no_sync (DDP)."""
    from contextlib import contextmanager

    torch.manual_seed(0)
    model = TeasrDiT(DiTConfig(hidden_size=32, depth=1, num_heads=2)).train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    g = torch.Generator().manual_seed(1)
    z0, zl = torch.randn(2, 48, 4, 4, generator=g), torch.randn(2, 48, 4, 4, generator=g)
    d = _draws(5, (48, 4, 4))
    cfg = SADConfig(lambda_cons=0.5, lambda_data=2.0, lambda_adv=0.25, lambda_rect=3.0, lambda_last=1.5)
    kw = dict(decode=lambda z: torch.pixel_shuffle(z, 4), x0=torch.pixel_shuffle(z0, 4).clamp(-1, 1))
    whole = sad_losses(model, z0, zl, d, cfg, **kw)
    whole["loss"].backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    calls, synced = [], []

    @contextmanager
    def no_sync():
        synced.append(False)
        yield

    def backward(loss):
        assert loss.requires_grad
        calls.append(len(synced))
        loss.backward()

    split = sad_losses(model, z0, zl, d, cfg, backward=backward, no_sync=no_sync, **kw)
    assert calls == [1, 2, 3, 4, 4]  # 5 graphs; the last one is built and reduced outside no_sync
    assert not any(v.requires_grad for v in split.values())
    for k in whole:
        assert split[k].item() == pytest.approx(whole[k].item(), rel=1e-6), k
    for p, w in zip(model.parameters(), want):
        torch.testing.assert_close(p.grad, w, atol=1e-6, rtol=1e-5)


def test_draw_sample_reproducible_per_generator_seed():
    shape = (3, 4, 4)
    a = draw_sample(shape, SADConfig(), torch.Generator().manual_seed(11))
    b = draw_sample(shape, SADConfig(), torch.Generator().manual_seed(11))
    c = draw_sample(shape, SADConfig(), torch.Generator().manual_seed(12))
    assert set(a) == set("eps t s_cons eps_one t_adv eps_adv s_rect eps_rect lpips_shift n_last".split())
    assert a["lpips_shift"].tolist() == [0, 0]  # no jitter configured
    j = draw_sample(shape, SADConfig(lpips_jitter=4), torch.Generator().manual_seed(11))
    jittered = ("lpips_shift", "n_last")  # jitter adds a draw, changes none before it
    assert all(torch.equal(a[k], j[k]) for k in a if k not in jittered)
    counts = {
        draw_sample(shape, SADConfig(last_steps=(2, 4)), torch.Generator().manual_seed(i))["n_last"].item()
        for i in range(20)
    }
    assert counts == {2, 4}
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["eps"], c["eps"]) and a["t"] != c["t"]
    for k in ("eps", "eps_one", "eps_adv", "eps_rect"):
        assert a[k].shape == shape
    assert not torch.equal(a["eps"], a["eps_one"])  # independent noises
    for seed in range(50):
        d = draw_sample(shape, SADConfig(), torch.Generator().manual_seed(seed))
        assert 0 <= d["s_cons"] <= d["t"] < 1  # s ~ U(0, t)
        assert 1e-3 <= d["t_adv"] <= 1 and 1e-3 <= d["s_rect"] <= 1


def test_last_jump_is_the_samplers_output_with_gradient_through_the_last_jump_only():
    from teasr_cli.sampler import sample

    _, zl, eps, _ = tensors(21)
    m, n = Linear(), torch.tensor([2, 4])
    x = last_jump(m, eps, zl, n)
    x.sum().backward()

    def velocity(z, t, z_lq, s):  # the sampler's call: float times
        return m(z, torch.full((z.shape[0],), t), z_lq, torch.full((z.shape[0],), s))

    z_tau = []
    for i, steps in enumerate(n.tolist()):
        states = []
        with torch.no_grad():
            out = sample(velocity, eps[i : i + 1], zl[i : i + 1], steps, lambda k, _, z: states.append(z))
        torch.testing.assert_close(x[i : i + 1].detach(), out)
        z_tau.append(states[-2])  # after n - 1 jumps: where the last one starts
    # the gradient is the last jump's alone, from the sampler's state at tau = 1/n held fixed
    fresh, z_tau, tau = Linear(), torch.cat(z_tau), torch.tensor([1 / 2, 1 / 4])
    (z_tau - tau.view(-1, 1, 1, 1) * fresh(z_tau, tau, zl, tau * 0)).sum().backward()
    for p, want in zip(m.parameters(), fresh.parameters()):
        torch.testing.assert_close(p.grad, want.grad)


def test_last_jump_of_an_x0_oracle_lands_on_the_data_at_any_step_count():
    z0, _, eps, _ = tensors(22)
    oracle = lambda z, t, z_lq, s: (z - z_lq) / t.view(-1, 1, 1, 1)  # noqa: E731  (the condition is the data)
    for n in ([1, 3], [2, 4], [5, 30]):
        torch.testing.assert_close(last_jump(oracle, eps, z0, torch.tensor(n)), z0)


def test_last_jump_runs_each_sample_through_its_own_step_count_only():
    _, zl, eps, _ = tensors(24)
    m = Linear()
    last_jump(m, eps, zl, torch.tensor([2, 4]))
    # (t, s) of each forward: both samples' first jump, the 4-step sample's second and third, both last jumps
    want = [([1, 1], [0.5, 0.75]), ([0.75], [0.5]), ([0.5], [0.25]), ([0.5, 0.25], [0, 0])]
    assert [(t.tolist(), s.tolist()) for t, s in m.calls] == want


def test_sad_losses_last_term_is_the_data_loss_of_the_last_jump():
    z0, zl, *_ = tensors(23)
    d = _draws(4)
    d["n_last"] = torch.tensor([3, 2])
    x0 = z0.tanh()
    cfg = SADConfig(lambda_flow=0, lambda_cons=0, lambda_data=0, lambda_adv=0, lambda_rect=0, lambda_last=2.0)
    out = sad_losses(Linear(), z0, zl, d, cfg, decode=lambda z: 2 * z, x0=x0)
    assert set(out) == {"last", "loss"}
    want = mse(2 * last_jump(Linear(), d["eps_one"], zl, d["n_last"]), x0)
    assert out["last"].item() == pytest.approx(want, rel=1e-6)
    assert out["loss"].item() == pytest.approx(2 * want, rel=1e-6)
