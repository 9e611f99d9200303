"""Diffusion objectives and sampling, checked against closed-form Gaussian references.

For data x0 ~ N(M, S²) i.i.d. per element and x_t = a·x0 + b·ε, the optimal predictions are
analytic (Var = a²S² + b²): E[ε|x_t] = b(x_t − aM)/Var, E[x0|x_t] = M + aS²(x_t − aM)/Var.
The schedule here is recomputed with numpy, independently of ditx.
"""

import math

import numpy as np
import pytest
import torch

from ditx.diffusion import (
    SCHEDULERS,
    DDPMObjective,
    RectifiedFlowObjective,
    VPredictionObjective,
    apply_guidance,
    sample,
)
from ditx.registry import objectives

M, S = 1.5, 0.5
BETAS = np.linspace(1e-4, 0.02, 1000)
ALPHA_BAR = np.cumprod(1 - BETAS)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def coefficients(kind, t):
    """(a, b) of x_t = a·x0 + b·ε as (B, 1, ...) float64, from the model's t (0..1000 scale)."""
    if kind == "flow":
        sigma = t.double() / 1000
        a, b = 1 - sigma, sigma
    else:
        ab = torch.from_numpy(ALPHA_BAR)[t.long()]
        a, b = ab.sqrt(), (1 - ab).sqrt()
    return a.view(-1, 1, 1, 1), b.view(-1, 1, 1, 1)


class Oracle:
    """The Bayes-optimal model for Gaussian data; ``kind`` is "eps", "v" or "flow" (velocity).

    ``variance`` appends the learned-Σ interpolation channel with that constant value.
    """

    def __init__(self, kind, variance=None):
        self.kind, self.variance = kind, variance

    def __call__(self, x, t, y=None):
        a, b = coefficients(self.kind, t)
        x = x.double()
        var = a**2 * S**2 + b**2
        eps = b * (x - a * M) / var
        x0 = M + a * S**2 * (x - a * M) / var
        out = {"eps": eps, "v": a * eps - b * x0, "flow": eps - x0}[self.kind].float()
        if self.variance is not None:
            out = torch.cat([out, torch.full_like(out, self.variance)], dim=1)
        return out


def gaussian_data(shape, seed=1):
    return M + S * torch.randn(shape, generator=gen(seed))


# ---------------------------------------------------------------- sampling against the oracle

ORACLE_CASES = [
    # (objective, kwargs, oracle, scheduler, steps); v=0 is the geometric mean of β_t and β̃_t
    ("ddpm", {}, Oracle("eps", variance=0.0), "ddpm", 250),
    ("ddpm", {}, Oracle("eps", variance=0.0), "ddim", 100),
    ("ddpm", {}, Oracle("eps", variance=0.0), "dpm-solver++", 25),
    ("ddpm", {"learn_sigma": False}, Oracle("eps"), "ddpm", 250),
    ("v-prediction", {}, Oracle("v"), "ddpm", 250),
    ("v-prediction", {}, Oracle("v"), "ddim", 100),
    ("v-prediction", {}, Oracle("v"), "dpm-solver++", 25),
    ("rectified-flow", {}, Oracle("flow"), "flow-euler", 50),
    ("rectified-flow", {"shift": 3.0}, Oracle("flow"), "flow-euler", 100),  # fewer low-noise steps
    ("ddpm", {}, Oracle("eps", variance=0.0), "unipc", 25),
    ("v-prediction", {}, Oracle("v"), "unipc", 25),
    ("rectified-flow", {}, Oracle("flow"), "flow-heun", 13),
    ("rectified-flow", {}, Oracle("flow"), "flow-dpm-solver++", 25),
    ("rectified-flow", {"shift": 3.0}, Oracle("flow"), "flow-unipc", 25),
]


@pytest.mark.parametrize("name,kwargs,oracle,scheduler,steps", ORACLE_CASES)
def test_oracle_samples_match_data_distribution(name, kwargs, oracle, scheduler, steps):
    objective = objectives.build(name, **kwargs)
    x = sample(oracle, objective, (10000, 1, 1, 1), scheduler=scheduler, num_steps=steps, generator=gen())
    assert x.shape == (10000, 1, 1, 1) and torch.isfinite(x).all()
    assert abs(x.mean().item() - M) < 0.05 * M
    assert abs(x.std().item() - S) < 0.05 * S


def ode_map(kind, z):
    """Where the probability-flow ODE takes noise z for Gaussian data: per element it is the
    monotone map between the start's marginal and N(M, S²). Flow starts at σ = 1 (pure noise);
    DDPM's last step t = 999 still holds a·x0 (a = √ᾱ ≈ 0.006), marginal N(a·M, a²S² + b²)."""
    if kind == "flow":
        return M + S * z
    a, b = math.sqrt(ALPHA_BAR[-1]), math.sqrt(1 - ALPHA_BAR[-1])
    return M + S * (z - a * M) / math.sqrt(a**2 * S**2 + b**2)


DETERMINISTIC = [  # (objective, oracle, first-order scheduler, second-order schedulers)
    ("ddpm", Oracle("eps", variance=0.0), "ddim", ["dpm-solver++", "unipc"]),
    ("v-prediction", Oracle("v"), "ddim", ["dpm-solver++", "unipc"]),
    ("rectified-flow", Oracle("flow"), "flow-euler", ["flow-heun", "flow-dpm-solver++", "flow-unipc"]),
]


@pytest.mark.parametrize("name,oracle,euler,second", DETERMINISTIC)
def test_deterministic_solvers_follow_the_closed_form_ode_and_second_order_ones_converge_faster(
    name, oracle, euler, second
):
    """Each noise sample lands where the exact ODE takes it: at 25 steps every second-order
    solver is within 0.3x the first-order one's error (DDIM, flow Euler: 0.14 and 0.07 here),
    and all of them within 0.04 at 100 steps."""
    objective = objectives.build(name)
    z = torch.linspace(-2.5, 2.5, 101).view(-1, 1, 1, 1)
    exact = ode_map(oracle.kind, z.double())

    def error(scheduler, steps):
        stats = {}
        x = sample(oracle, objective, tuple(z.shape), scheduler=scheduler, num_steps=steps, noise=z, stats=stats)
        heun = scheduler == "flow-heun"
        assert stats["network_evaluations"] == (2 * steps - 1 if heun else steps)
        return (x.double() - exact).abs().max().item()

    first = error(euler, 25)
    for scheduler in second:
        assert error(scheduler, 25) < 0.3 * first, scheduler
    for scheduler in [euler, *second]:
        assert error(scheduler, 100) < 0.04, scheduler


def test_ddpm_sampler_uses_learned_variance_and_others_ignore_it():
    def run(scheduler, v):
        x = sample(
            Oracle("eps", variance=v),
            DDPMObjective(),
            (2000, 1, 1, 1),
            scheduler=scheduler,
            num_steps=50,
            generator=gen(),
            progress=v > 0,
        )
        return x.std().item()

    assert run("ddpm", 1.0) > run("ddpm", -1.0) + 0.02  # Σ = β_t adds more noise than β̃_t
    assert run("ddim", 1.0) == run("ddim", -1.0)


# ---------------------------------------------------------------- losses


def _mse_reference(kind, t_model):
    """E[(target − oracle)²] = Var[target | x_t]: a²S²/Var for ε; S²/Var for v and velocity
    (both are x_t/b − x0/b up to a term fixed by x_t, since a² + b² = 1, resp. a + b = 1)."""
    a, b = (c.flatten() for c in coefficients(kind, t_model))
    var = a**2 * S**2 + b**2
    return (a**2 * S**2 / var if kind == "eps" else S**2 / var).numpy()


@pytest.mark.parametrize(
    "objective,kind,t",
    [
        (DDPMObjective(), "eps", [10, 300, 900]),
        (DDPMObjective(learn_sigma=False), "eps", [10, 300, 900]),
        (VPredictionObjective(), "v", [10, 300, 900]),
        (RectifiedFlowObjective(), "flow", [0.05, 0.4, 0.9]),
    ],
)
def test_oracle_mse_matches_closed_form(objective, kind, t):
    n = 2048  # samples per timestep, 16 elements each
    x0 = gaussian_data((3 * n, 1, 4, 4))
    t = torch.tensor(t).repeat_interleave(n)
    t_model = t * 1000 if kind == "flow" else t
    oracle = Oracle(kind, variance=0.0 if getattr(objective, "learn_sigma", False) else None)
    terms = objective.loss(oracle, x0, t=t, generator=gen(2))
    assert terms["loss"].shape == (3 * n,)
    measured = terms["mse"].view(3, n).mean(1).numpy()
    np.testing.assert_allclose(measured, _mse_reference(kind, t_model[::n]), rtol=0.05)

    perturbed = objective.loss(lambda x, t, y=None: oracle(x, t) + 0.1, x0, t=t, generator=gen(2))
    assert perturbed["mse"].mean() > terms["mse"].mean()


class TrueNoise:
    """Predicts exactly the ε used for noising, with a constant learned-Σ channel v."""

    def __init__(self, noise, v):
        self.noise, self.v = noise, v

    def __call__(self, x, t, y=None):
        return torch.cat([self.noise, torch.full_like(self.noise, self.v)], dim=1)


def test_vb_is_zero_for_exact_posterior_and_matches_closed_form_kl():
    objective = DDPMObjective()
    x0 = torch.rand(4, 3, 4, 4, generator=gen(3)) * 2 - 1
    noise = torch.randn(x0.shape, generator=gen(4))
    t = torch.tensor([1, 10, 500, 999])

    # v = -1 selects log β̃_t: the exact posterior, so KL = 0.
    exact = objective.loss(TrueNoise(noise, -1.0), x0, noise=noise, t=t)
    assert torch.allclose(exact["vb"], torch.zeros(4), atol=1e-5)
    assert torch.allclose(exact["mse"], torch.zeros(4)) and torch.allclose(exact["loss"], exact["vb"])

    # v = +1 selects log β_t: KL(N(μ, β̃) ‖ N(μ, β)) = ½(log(β/β̃) + β̃/β − 1) nats per dim.
    ab, ab_prev = ALPHA_BAR[t], ALPHA_BAR[t - 1]
    post_var = BETAS[t] * (1 - ab_prev) / (1 - ab)
    ratio = post_var / BETAS[t]
    kl_bits = 0.5 * (-np.log(ratio) + ratio - 1) / math.log(2)
    large = objective.loss(TrueNoise(noise, 1.0), x0, noise=noise, t=t)
    np.testing.assert_allclose(large["vb"].numpy(), kl_bits, rtol=1e-3, atol=1e-7)
    assert large["vb"][0] > 0.01  # β and β̃ differ most at small t

    # A mean error δ in ε moves x0 by −bδ/a and the posterior mean by c0·(−bδ/a):
    # KL = ½ (c0·bδ/a)² / β̃ per dim at the exact variance.
    delta = 0.1
    shifted = objective.loss(TrueNoise(noise + delta, -1.0), x0, noise=noise, t=t)
    c0 = BETAS[t] * np.sqrt(ab_prev) / (1 - ab)
    mean_err = c0 * np.sqrt(1 - ab) / np.sqrt(ab) * delta
    # float32 x0 = (x_t − bε)/a loses a few digits at t = 999 (a ≈ 0.006)
    np.testing.assert_allclose(shifted["vb"].numpy(), 0.5 * mean_err**2 / post_var / math.log(2), rtol=5e-3)


def test_vb_nonnegative_and_decoder_nll_at_t0():
    objective = DDPMObjective()
    x0 = torch.rand(64, 2, 3, 3, generator=gen(5)) * 2 - 1
    t = torch.arange(64) * 15 + 1  # 1..946
    model = lambda x, t, y=None: torch.tanh(torch.randn(x.shape[0], 4, 3, 3, generator=gen(6)))
    terms = objective.loss(model, x0, t=t, generator=gen(7))
    assert (terms["vb"] >= -1e-6).all()

    # t = 0 uses the discretized Gaussian decoder NLL: with the exact mean x0 and the clipped
    # variance β̃_1, −log2 P(|N(0, β̃_1)| < 1/255) bits per dim (x0 away from the ±1 edge bins).
    x0 = x0.clamp(-0.99, 0.99)
    noise = torch.randn(x0.shape, generator=gen(8))
    nll = objective.loss(TrueNoise(noise, -1.0), x0, noise=noise, t=torch.zeros(64, dtype=torch.long))
    std = math.sqrt(BETAS[1] * (1 - ALPHA_BAR[0]) / (1 - ALPHA_BAR[1]))
    expected = -math.log2(math.erf(1 / 255 / std / math.sqrt(2)))
    np.testing.assert_allclose(nll["vb"].numpy(), expected, rtol=1e-3)


def test_hybrid_loss_gradients_are_split_between_mean_and_variance_channels():
    objective = DDPMObjective()
    x0 = torch.randn(8, 3, 4, 4, generator=gen(9))
    t = torch.tensor([1, 5, 50, 200, 400, 600, 800, 999])

    def fresh():
        eps = torch.zeros(1, requires_grad=True)
        v = torch.full((1,), 0.3, requires_grad=True)
        model = lambda x, t, y=None: torch.cat([x * 0 + eps, x * 0 + v], dim=1)
        return eps, v, model

    eps, v, model = fresh()
    objective.loss(model, x0, t=t, generator=gen(10))["vb"].sum().backward()
    assert eps.grad is None or eps.grad.abs().max() == 0  # stop-gradient on the mean
    assert v.grad.abs().max() > 0

    eps, v, model = fresh()
    objective.loss(model, x0, t=t, generator=gen(10))["mse"].sum().backward()
    assert v.grad is None or v.grad.abs().max() == 0
    assert eps.grad.abs().max() > 0


def test_ddpm_schedule_matches_numpy_and_diffusers():
    objective = DDPMObjective()
    np.testing.assert_allclose(objective.alphas_cumprod, ALPHA_BAR, rtol=1e-12)
    scheduler = objective.make_scheduler("ddpm", 1000)
    np.testing.assert_allclose(scheduler.alphas_cumprod.numpy(), ALPHA_BAR, rtol=1e-5)
    assert objective.out_channels(4) == 8 and DDPMObjective(learn_sigma=False).out_channels(4) == 4
    assert VPredictionObjective().out_channels(4) == 4 and RectifiedFlowObjective().out_channels(4) == 4


def test_model_gets_documented_timesteps():
    seen = {}

    def model(x, t, y=None):
        seen["t"], seen["y"] = t, y
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    x0 = torch.randn(5, 3, 2, 2, 2)  # 3 spatial dims
    DDPMObjective().loss(model, x0, y=torch.arange(5), generator=gen())
    t = seen["t"]
    assert t.dtype == torch.float32 and t.shape == (5,) and (t == t.round()).all()
    assert ((0 <= t) & (t <= 999)).all() and torch.equal(seen["y"], torch.arange(5))

    sigma = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    RectifiedFlowObjective().loss(lambda x, t, y=None: (seen.update(t=t), x)[1], x0, t=sigma)
    assert torch.allclose(seen["t"], sigma * 1000)


# ---------------------------------------------------------------- rectified-flow timesteps


def test_logit_normal_median_and_shift():
    n = 20000
    plain = RectifiedFlowObjective(logit_mean=0.5, logit_std=1.0)
    t = plain.sample_t(n, generator=gen(11))
    assert ((t > 0) & (t < 1)).all()
    assert abs(t.median().item() - 1 / (1 + math.exp(-0.5))) < 0.01

    shifted = RectifiedFlowObjective(logit_mean=0.5, logit_std=1.0, shift=3.0).sample_t(n, generator=gen(11))
    assert torch.allclose(shifted, 3 * t / (1 + 2 * t), atol=1e-6)
    assert shifted.median() > t.median()


def test_flow_sampler_grid_uses_sample_shift():
    sigmas = RectifiedFlowObjective(sample_shift=3.0).make_scheduler("flow-euler", 4).sigmas
    grid = torch.tensor([1.0, 0.75, 0.5, 0.25])
    assert torch.allclose(sigmas, torch.cat([3 * grid / (1 + 2 * grid), torch.zeros(1)]))


@pytest.mark.parametrize("scheduler", ["flow-euler", "flow-heun", "flow-dpm-solver++", "flow-unipc"])
def test_every_flow_solver_gives_the_model_the_exact_shifted_sigmas_of_one_grid(scheduler):
    """t = 1000·σ with σ = shift(1, 6/7, ..., 1/7) (DPM-Solver++: its own σ_max = 0.999, the grid
    scaled by 0.999 before the shift), not diffusers' int64 timesteps (σ·1000 truncated)."""
    seen = []

    def model(x, t, y=None):
        seen.append(t[0].item())
        return torch.zeros_like(x)

    shift, steps = 3.0, 7
    grid = np.linspace(1.0, 1.0 / steps, steps) * (0.999 if scheduler == "flow-dpm-solver++" else 1.0)
    sigmas = shift * grid / (1 + (shift - 1) * grid)
    expected = sigmas if scheduler != "flow-heun" else np.concatenate([sigmas[:1], np.repeat(sigmas[1:], 2)])
    sample(model, RectifiedFlowObjective(sample_shift=shift), (2, 1, 1, 1), scheduler=scheduler, num_steps=steps)
    np.testing.assert_allclose(seen, 1000 * expected, atol=0.01)


def test_shift_grows_with_the_square_root_of_the_latent_size():
    """SD3 / Open-Sora: at 4x the reference's latent positions (2x the frames, 2x the width) the
    shift doubles, in training draws and in the sampler's grid; at the reference it is unchanged."""
    objective = RectifiedFlowObjective(shift=1.5, sample_shift=3.0, shift_reference=[8, 8, 8])
    plain = RectifiedFlowObjective().sample_t(1000, generator=gen(5))
    at_reference = objective.sample_t(1000, shape=(4, 8, 8, 8), generator=gen(5))
    torch.testing.assert_close(at_reference, 1.5 * plain / (1 + 0.5 * plain))
    larger = objective.sample_t(1000, shape=(4, 16, 8, 16), generator=gen(5))
    torch.testing.assert_close(larger, 3.0 * plain / (1 + 2.0 * plain))
    grid = torch.tensor([1.0, 0.75, 0.5, 0.25])
    sigmas = objective.make_scheduler("flow-euler", 4, shape=(4, 16, 8, 16)).sigmas
    assert torch.allclose(sigmas, torch.cat([6 * grid / (1 + 5 * grid), torch.zeros(1)]))
    assert torch.allclose(objective.make_scheduler("flow-euler", 4).sigmas[:4], 3 * grid / (1 + 2 * grid))
    with pytest.raises(ValueError, match=r"shift_reference \[8, 8, 8\] has 3 dims, but the latents are"):
        objective.sample_t(2, shape=(4, 8, 8))
    with pytest.raises(ValueError, match=r"objective.shift_reference must be a latent size"):
        RectifiedFlowObjective(shift_reference=[8, 0])


# ---------------------------------------------------------------- guidance


def test_apply_guidance():
    cond = torch.randn(2, 8, 4, 4, generator=gen(12))
    uncond = torch.randn(2, 8, 4, 4, generator=gen(13))
    assert torch.equal(apply_guidance(cond, uncond, 1.0), cond)

    full = apply_guidance(cond, uncond, 4.0)
    assert torch.allclose(full, uncond + 4.0 * (cond - uncond))

    partial = apply_guidance(cond, uncond, 4.0, guided_channels=3)
    assert torch.allclose(partial[:, :3], uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3]))
    assert torch.equal(partial[:, 3:], cond[:, 3:])


def test_cfg_sampling_end_to_end_on_video_shape():
    """Constant velocity 1 for real labels and 0 for the null label: one Euler pass from σ=1 to 0
    gives x0 = noise − Σ Δσ·v = noise − s on guided channels and noise − 1 elsewhere."""
    null, B, scale = 10, 3, 4.0
    calls = []

    def model(x, t, y=None, context=None):
        calls.append((x.shape[0], y.clone(), context.shape[0]))
        v = (y != null).float().view(-1, 1, 1, 1, 1)
        return v.expand_as(x).clone()

    noise = torch.randn(B, 2, 2, 3, 3, generator=gen(14))  # (B, C, T, H, W)
    kwargs = dict(
        scheduler="flow-euler",
        num_steps=7,
        y=torch.tensor([0, 1, 2]),
        null_class=null,
        guidance_scale=scale,
        model_kwargs={"context": torch.randn(B, 5)},
        noise=noise,
    )
    out = sample(model, RectifiedFlowObjective(), noise.shape, **kwargs)
    assert len(calls) == 7 and all(n == 2 * B and c == 2 * B for n, _, c in calls)
    assert torch.equal(calls[0][1], torch.tensor([0, 1, 2, null, null, null]))
    assert torch.allclose(out, noise - scale, atol=1e-5)

    out = sample(model, RectifiedFlowObjective(), noise.shape, guided_channels=1, **kwargs)
    assert torch.allclose(out[:, :1], noise[:, :1] - scale, atol=1e-5)
    assert torch.allclose(out[:, 1:], noise[:, 1:] - 1, atol=1e-5)

    with pytest.raises(ValueError, match="null_class"):
        sample(model, RectifiedFlowObjective(), noise.shape, **{**kwargs, "null_class": None})


def test_guidance_interval_guides_only_inside_it_and_saves_the_unconditional_pass_elsewhere():
    """Flow Euler on the grid σ = 1, 0.8, ..., 0.2: the velocity is 1 for real labels and 0 for
    the null one, so a guided step moves by scale·Δσ and an unguided one by Δσ. The interval
    [0.3, 0.7] holds σ = 0.6 and 0.4: x0 = noise − 0.2·(3·1 + 2·scale)."""
    null, B, scale = 10, 3, 4.0
    calls = []

    def model(x, t, y=None, context=None):
        calls.append((x.shape[0], round(t[0].item()), y.tolist(), context.shape[0]))
        return (y != null).float().view(-1, 1, 1, 1).expand_as(x).clone()

    noise = torch.randn(B, 1, 2, 2, generator=gen(15))
    stats = {}
    out = sample(model, RectifiedFlowObjective(), noise.shape, scheduler="flow-euler", num_steps=5,
                 y=torch.tensor([0, 1, 2]), null_class=null, guidance_scale=scale, noise=noise,
                 model_kwargs={"context": torch.randn(B, 5)}, guidance_interval=[0.3, 0.7], stats=stats)  # fmt: skip
    assert [(n, t) for n, t, _, _ in calls] == [(3, 1000), (3, 800), (6, 600), (6, 400), (3, 200)]
    assert calls[0][2] == [0, 1, 2] and calls[2][2] == [0, 1, 2, null, null, null]
    assert all(c == n for n, _, _, c in calls)  # the context follows the rows
    assert stats["network_evaluations"] == 7
    assert torch.allclose(out, noise - 0.2 * (3 + 2 * scale), atol=1e-5)

    for bad in ([0.8, 0.2], [0.1], [-0.1, 0.5], "high"):
        with pytest.raises(ValueError, match="guidance_interval must be"):
            sample(model, RectifiedFlowObjective(), noise.shape, scheduler="flow-euler", num_steps=2,
                   y=torch.tensor([0, 1, 2]), null_class=null, guidance_scale=scale, noise=noise,
                   model_kwargs={"context": torch.randn(B, 5)}, guidance_interval=bad)  # fmt: skip


# ---------------------------------------------------------------- errors and registry


def test_scheduler_errors_name_allowed_values():
    with pytest.raises(ValueError, match="flow-euler") as e:
        sample(Oracle("eps", 0.0), DDPMObjective(), (2, 1, 1, 1), scheduler="flow-euler")
    assert all(s in str(e.value) for s in ("ddpm", "ddim", "dpm-solver++"))

    with pytest.raises(ValueError, match="rectified-flow") as e:
        sample(Oracle("flow"), RectifiedFlowObjective(), (2, 1, 1, 1), scheduler="ddim")
    assert "flow-euler" in str(e.value)

    with pytest.raises(ValueError, match="'euler-a'") as e:
        sample(Oracle("v"), VPredictionObjective(), (2, 1, 1, 1), scheduler="euler-a")
    assert all(s in str(e.value) for s in SCHEDULERS)


def test_wrong_model_output_channels_raise():
    x0 = torch.randn(2, 1, 3, 3)
    with pytest.raises(ValueError, match="out_channels"):
        DDPMObjective().loss(lambda x, t, y=None: x, x0)  # learned Σ needs 2C channels
    with pytest.raises(ValueError, match=r"\(2, 1, 3, 3\)"):
        VPredictionObjective().loss(lambda x, t, y=None: torch.cat([x, x], 1), x0)


def test_registry():
    assert {"ddpm", "v-prediction", "rectified-flow"} <= set(objectives.names())
    objective = objectives.build("rectified-flow", shift=3.0)
    assert isinstance(objective, RectifiedFlowObjective) and objective.shift == 3.0
    assert isinstance(objectives.build("ddpm", learn_sigma=False), DDPMObjective)


def test_ddim_with_clipping_rederives_eps_from_the_clipped_x0():
    """ADM/GLIDE's DDIM: after clipping x0 to [-1, 1] the noise is re-derived from it, so each
    step lands on a point consistent with the clipped x0. Reference loop in float64 numpy."""
    objective = objectives.build("ddpm", learn_sigma=False, clip_sample=True)

    def model(x, t, y=None):  # predicts eps = x/2: x0 = x·(1 − b/2)/a leaves [-1, 1] at high noise
        return 0.5 * x

    noise = torch.randn(64, 1, 1, 1, generator=gen(3))
    x = sample(model, objective, tuple(noise.shape), scheduler="ddim", num_steps=10, noise=noise)
    timesteps = objective.make_scheduler("ddim", 10, device="cpu").timesteps.tolist()
    assert timesteps[0] == 999 and len(timesteps) == 10
    ref = noise.double().numpy()
    for t in timesteps:
        a, prev = ALPHA_BAR[t], ALPHA_BAR[t - 100] if t - 100 >= 0 else 1.0
        x0 = np.clip((ref - np.sqrt(1 - a) * 0.5 * ref) / np.sqrt(a), -1, 1)
        eps = (ref - np.sqrt(a) * x0) / np.sqrt(1 - a)
        ref = np.sqrt(prev) * x0 + np.sqrt(1 - prev) * eps
    np.testing.assert_allclose(x.numpy(), ref, atol=1e-4)
