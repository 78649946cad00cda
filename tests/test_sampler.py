"""Any-step Euler sampler: the schedule, exactness on straight flows, what the model is asked."""

import pytest
import torch

from teasr_cli.sampler import sample, timesteps


def data(seed=0, shape=(2, 48, 5, 7)):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g), torch.randn(shape, generator=g)  # eps, z0


@pytest.mark.parametrize("steps,want", [(1, [1.0, 0.0]), (2, [1.0, 0.5, 0.0]), (4, [1.0, 0.75, 0.5, 0.25, 0.0])])
def test_timesteps_values(steps, want):
    assert timesteps(steps) == want


@pytest.mark.parametrize("steps", [1, 3, 7, 30, 1000])
def test_timesteps_run_from_exactly_one_to_exactly_zero_decreasing(steps):
    taus = timesteps(steps)
    assert len(taus) == steps + 1 and taus[0] == 1.0 and taus[-1] == 0.0
    assert all(a > b for a, b in zip(taus, taus[1:]))


@pytest.mark.parametrize("steps", [0, -1])
def test_timesteps_rejects_no_steps(steps):
    with pytest.raises(ValueError):
        timesteps(steps)


@pytest.mark.parametrize("steps", [1, 2, 4, 30])
def test_constant_velocity_lands_on_the_data(steps):
    """The straight flow z_t = t eps + (1-t) z0 has v = eps - z0 at every t: any step count is exact."""
    eps, z0 = data()
    z = sample(lambda z, t, zl, s: eps - z0, eps, torch.zeros_like(eps), steps)
    torch.testing.assert_close(z, z0, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("steps", [1, 3, 8])
def test_sampler_feeds_back_its_current_latent(steps):
    """v = (z_t - z0) / t is the straight flow's velocity read off the current latent, so it
    only lands on z0 if every call sees the z the previous step produced."""
    eps, z0 = data(1)
    seen = []

    def velocity(z, t_cur, z_lq, t_tar):
        expect = t_cur * eps + (1 - t_cur) * z0  # where the sampler must be at t_cur
        seen.append((z - expect).abs().max().item())
        return (z - z0) / t_cur

    out = sample(velocity, eps, z0, steps)
    torch.testing.assert_close(out, z0, atol=1e-5, rtol=1e-5)
    assert len(seen) == steps and max(seen) < 1e-5


@pytest.mark.parametrize("steps", [1, 2, 5])
def test_model_is_told_where_each_step_lands(steps):
    eps, z0 = data(2)
    calls = []

    def velocity(z, t_cur, z_lq, t_tar):
        calls.append((t_cur, t_tar, z_lq))
        return torch.zeros_like(z)

    out = sample(velocity, eps, z0, steps)
    taus = timesteps(steps)
    assert [(a, b) for a, b, _ in calls] == list(zip(taus[:-1], taus[1:]))
    assert all(zl is z0 for _, _, zl in calls)  # the condition is passed through untouched
    assert torch.equal(out, eps)  # zero velocity: the noise comes back unchanged


@pytest.mark.parametrize("steps", [1, 4])
def test_callback_once_per_step_in_order(steps):
    eps, z0 = data(3)
    calls = []
    sample(lambda z, t, zl, s: eps - z0, eps, z0, steps, callback=lambda i, n, z: calls.append((i, n, z.clone())))
    assert [(i, n) for i, n, _ in calls] == [(i + 1, steps) for i in range(steps)]
    # each callback sees the latent after its step: on the straight path, at tau_{i}
    for i, _, z in calls:
        t = 1 - i / steps
        torch.testing.assert_close(z, t * eps + (1 - t) * z0, atol=1e-5, rtol=1e-5)


def test_sampling_does_not_build_a_graph_or_touch_the_noise():
    eps, z0 = data(4)
    eps_copy = eps.clone()
    w = torch.ones(1, requires_grad=True)
    out = sample(lambda z, t, zl, s: (eps - z0) * w, eps, z0, 3)
    assert not out.requires_grad and torch.equal(eps, eps_copy)


def test_half_precision_velocity_is_accumulated_in_the_latent_dtype():
    eps, z0 = data(5)
    out = sample(lambda z, t, zl, s: (eps - z0).half(), eps, z0, 4)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, z0, atol=1e-2, rtol=0)
