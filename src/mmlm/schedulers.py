"""Diffusion schedules and samplers as small pure functions (the numbers of diffusers' DDPMScheduler, DDIMScheduler
and EulerDiscreteScheduler, step for step).

The forward process noises a clean x0 in T steps: x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, where a_t (`alphas_cumprod`)
is the product of (1 - beta_s) up to t. A network learns to predict eps (or the velocity
v = sqrt(a_t) eps - sqrt(1 - a_t) x0, or x0 itself: `prediction_type`); a sampler walks back from pure noise
along a few of the T timesteps, each `*_step` turning the prediction at t into the sample at the previous one:

    DDPM (Ho et al. 2020)     ancestral: the posterior mean of x_{t-1} plus fresh noise
    DDIM (Song et al. 2021)   deterministic (eta = 0): x0 and eps re-combined at the earlier noise level
    Euler (Karras et al. 2022) the probability-flow ODE in sigma = sqrt((1 - a) / a), one Euler step each

Each function takes the schedule's config (`NoiseScheduleConfig`) and tensors; nothing is kept between steps.
Arithmetic is float32 in the order diffusers does it, so the two agree to rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .diffusion_config import NoiseScheduleConfig

SAMPLERS = ("ddim", "ddpm", "euler")


# ----------------------------------------------------------------------------- the forward process

def betas(cfg: NoiseScheduleConfig) -> torch.Tensor:
    """(T,) float32 noise variances per training step."""
    T = cfg.num_train_timesteps
    if cfg.beta_schedule == "linear":
        return torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float32)
    if cfg.beta_schedule == "scaled_linear":  # Stable Diffusion's: linear in sqrt(beta)
        return torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, T, dtype=torch.float32) ** 2
    # squaredcos_cap_v2 (Nichol & Dhariwal 2021): a_t follows cos^2, each beta capped at 0.999
    alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return torch.tensor([min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)], dtype=torch.float32)


def alphas_cumprod(cfg: NoiseScheduleConfig) -> torch.Tensor:
    """(T,) a_t = prod_{s <= t} (1 - beta_s): the share of the signal's variance left at step t."""
    return torch.cumprod(1.0 - betas(cfg), dim=0)


def _per_sample(a: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """a[t] for each sample, shaped (B, 1, 1, ...) to broadcast against `like`."""
    v = a.to(device=like.device, dtype=like.dtype)[t.to(like.device)].flatten()
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def add_noise(cfg: NoiseScheduleConfig, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise; t (B,) integer timesteps."""
    a = alphas_cumprod(cfg)
    return _per_sample(a**0.5, t, x0) * x0 + _per_sample((1 - a) ** 0.5, t, x0) * noise


def velocity(cfg: NoiseScheduleConfig, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v = sqrt(a_t) noise - sqrt(1 - a_t) x0 (Salimans & Ho 2022): what a v-prediction model learns."""
    a = alphas_cumprod(cfg)
    return _per_sample(a**0.5, t, x0) * noise - _per_sample((1 - a) ** 0.5, t, x0) * x0


def training_target(cfg: NoiseScheduleConfig, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the network should output at x_t: the noise, the velocity or x0, by `prediction_type`."""
    if cfg.prediction_type == "epsilon":
        return noise
    if cfg.prediction_type == "v_prediction":
        return velocity(cfg, x0, noise, t)
    return x0


def min_snr_weight(cfg: NoiseScheduleConfig, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """(B,) Min-SNR-gamma loss weights (Hang et al. 2023) for the timesteps t: each sample's squared error on x0,
    weighted by its signal-to-noise ratio SNR_t = a_t / (1 - a_t) capped at gamma, in the units of `prediction_type`.

    In x0 units the plain eps loss weighs a step by SNR_t and the plain v loss by SNR_t + 1, so the nearly clean steps
    (huge SNR), which teach least, dominate both; capping at gamma gives the middle of the schedule, where the layout
    and the shapes are decided, the larger share of the gradient.
        epsilon: min(SNR, gamma) / SNR      v_prediction: min(SNR, gamma) / (SNR + 1)      sample: min(SNR, gamma)
    """
    a = alphas_cumprod(cfg)[t.cpu()].to(t.device)
    snr = a / (1 - a)
    weight = snr.clamp(max=gamma)
    if cfg.prediction_type == "epsilon":
        return weight / snr
    if cfg.prediction_type == "v_prediction":
        return weight / (snr + 1)
    return weight


# ----------------------------------------------------------------------------- which timesteps a sampler visits

def timesteps(cfg: NoiseScheduleConfig, steps: int) -> torch.Tensor:
    """(steps,) int64 training timesteps, descending, spaced by `timestep_spacing`."""
    T = cfg.num_train_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be between 1 and the {T} training timesteps, got {steps}")
    if cfg.timestep_spacing == "linspace":
        return _linspace(0, T - 1, steps).round().flip(0).long()
    if cfg.timestep_spacing == "leading":
        return (torch.arange(steps, dtype=torch.int64) * (T // steps)).flip(0) + cfg.steps_offset
    return (T - torch.arange(steps, dtype=torch.float64) * (T / steps)).round().long() - 1  # trailing


def _linspace(start: float, stop: float, n: int) -> torch.Tensor:
    """float64 points as numpy.linspace makes them (i * step + start, the last one exactly `stop`)."""
    if n == 1:
        return torch.tensor([float(start)], dtype=torch.float64)
    x = torch.arange(n, dtype=torch.float64) * ((stop - start) / (n - 1)) + start
    x[-1] = stop
    return x


def _prediction_to_x0_eps(cfg: NoiseScheduleConfig, out: torch.Tensor, sample: torch.Tensor, a_t: torch.Tensor):
    """The network's output at x_t -> (predicted x0, predicted eps)."""
    b_t = 1 - a_t
    if cfg.prediction_type == "epsilon":
        return (sample - b_t ** (0.5) * out) / a_t ** (0.5), out
    if cfg.prediction_type == "v_prediction":
        return (a_t**0.5) * sample - (b_t**0.5) * out, (a_t**0.5) * out + (b_t**0.5) * sample
    return out, (sample - a_t ** (0.5) * out) / b_t ** (0.5)


# ----------------------------------------------------------------------------- the steps

def _noise(like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Standard normal noise shaped like `like`, drawn on the generator's device (a CPU generator gives the same
    numbers whatever device the model runs on) and moved to `like`'s."""
    device = generator.device if generator is not None else like.device
    return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=device).to(like.device)


def ddim_step(cfg: NoiseScheduleConfig, out: torch.Tensor, t: int, sample: torch.Tensor, steps: int, eta: float = 0.0,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """x_t -> x_{t - T/steps}: x0 and eps predicted at t, recombined at the earlier level
    (sqrt(a_prev) x0 + sqrt(1 - a_prev - s^2) eps, plus s * noise where s = eta * the DDPM posterior std)."""
    a = alphas_cumprod(cfg)
    prev = t - cfg.num_train_timesteps // steps
    a_t = a[t]
    a_prev = a[prev] if prev >= 0 else (torch.tensor(1.0) if cfg.set_alpha_to_one else a[0])
    x0, eps = _prediction_to_x0_eps(cfg, out, sample, a_t)
    if cfg.clip_sample:
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    variance = ((1 - a_prev) / (1 - a_t)) * (1 - a_t / a_prev)
    std = eta * variance ** (0.5)
    x = a_prev ** (0.5) * x0 + (1 - a_prev - std**2) ** (0.5) * eps
    if eta > 0:
        x = x + std * _noise(out, generator)
    return x


def ddpm_step(cfg: NoiseScheduleConfig, out: torch.Tensor, t: int, sample: torch.Tensor, prev: int,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """x_t -> x_prev drawn from the posterior q(x_prev | x_t, x0) with x0 predicted ("fixed_small" variance);
    `prev` is the next timestep of the sampler's list (-1 after the last)."""
    a = alphas_cumprod(cfg)
    a_t = a[t]
    a_prev = a[prev] if prev >= 0 else torch.tensor(1.0)
    b_t, b_prev = 1 - a_t, 1 - a_prev
    alpha_t = a_t / a_prev
    beta_t = 1 - alpha_t
    x0, _ = _prediction_to_x0_eps(cfg, out, sample, a_t)
    if cfg.clip_sample:
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    x = (a_prev ** (0.5) * beta_t) / b_t * x0 + alpha_t ** (0.5) * b_prev / b_t * sample  # the posterior mean
    if t > 0:
        noise = _noise(out, generator)
        variance = torch.clamp(b_prev / b_t * beta_t, min=1e-20)
        x = x + variance**0.5 * noise
    return x


def euler_sigmas(cfg: NoiseScheduleConfig, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The Euler sampler's (timesteps (steps,), sigmas (steps + 1,)) in float32: sigma = sqrt((1 - a) / a)
    interpolated at each (possibly fractional) timestep, then 0."""
    T = cfg.num_train_timesteps
    if not 1 <= steps <= T:
        raise ValueError(f"steps must be between 1 and the {T} training timesteps, got {steps}")
    if cfg.timestep_spacing == "linspace":
        ts = _linspace(0, T - 1, steps).float().flip(0)
    elif cfg.timestep_spacing == "leading":
        ts = (torch.arange(steps, dtype=torch.float64) * (T // steps)).float().flip(0) + cfg.steps_offset
    else:
        ts = (T - torch.arange(steps, dtype=torch.float64) * (T / steps)).round().float() - 1
    a = alphas_cumprod(cfg)
    table = (((1 - a) / a) ** 0.5).double()  # (T,)
    x = ts.double().clamp(0, T - 1)
    lo = x.floor().long()
    hi = (lo + 1).clamp(max=T - 1)
    sig = table[lo] + (table[hi] - table[lo]) * (x - lo)  # linear interpolation, as numpy.interp
    return ts, torch.cat([sig, torch.zeros(1, dtype=torch.float64)]).float()


def euler_scale(sample: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """What the network reads at noise level sigma: x / sqrt(sigma^2 + 1) (unit variance)."""
    return sample / ((sigma**2 + 1) ** 0.5)


def euler_step(cfg: NoiseScheduleConfig, out: torch.Tensor, sample: torch.Tensor, sigma: torch.Tensor,
               sigma_next: torch.Tensor) -> torch.Tensor:
    """x at sigma -> x at sigma_next along dx/dsigma = (x - x0) / sigma."""
    x = sample.to(torch.float32)
    if cfg.prediction_type == "epsilon":
        x0 = x - sigma * out
    elif cfg.prediction_type == "v_prediction":
        x0 = out * (-sigma / (sigma**2 + 1) ** 0.5) + (x / (sigma**2 + 1))
    else:
        x0 = out
    derivative = (x - x0) / sigma
    return (x + derivative * (sigma_next - sigma)).to(out.dtype)


# ----------------------------------------------------------------------------- a sampler, for the loop

@dataclass
class Sampler:
    """One sampler's plan for `steps` steps: the timesteps the network is called at, the scale of the initial
    noise, how the input is scaled at step i, and the step from i to i + 1."""

    name: str
    timesteps: torch.Tensor
    init_noise_sigma: float
    scale_input: Callable[[torch.Tensor, int], torch.Tensor]
    step: Callable[[torch.Tensor, int, torch.Tensor, torch.Generator | None], torch.Tensor]


def sampler(cfg: NoiseScheduleConfig, name: str, steps: int) -> Sampler:
    """The plan of sampler `name` ("ddim", "ddpm" or "euler") over `steps` steps."""
    if name == "ddim":
        ts = timesteps(cfg, steps)
        return Sampler(name, ts, 1.0, lambda x, i: x,
                       lambda out, i, x, g: ddim_step(cfg, out, int(ts[i]), x, steps))
    if name == "ddpm":
        ts = timesteps(cfg, steps)
        prev = [int(t) for t in ts[1:]] + [-1]
        return Sampler(name, ts, 1.0, lambda x, i: x,
                       lambda out, i, x, g: ddpm_step(cfg, out, int(ts[i]), x, prev[i], g))
    if name == "euler":
        ts, sig = euler_sigmas(cfg, steps)
        init = sig.max() if cfg.timestep_spacing in ("linspace", "trailing") else (sig.max() ** 2 + 1) ** 0.5
        return Sampler(name, ts, float(init), lambda x, i: euler_scale(x, sig[i]),
                       lambda out, i, x, g: euler_step(cfg, out, x, sig[i], sig[i + 1]))
    raise ValueError(f"scheduler {name!r} is not one of {SAMPLERS}")
