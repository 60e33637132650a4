"""Per-sample weighted denoising errors for one round, batched across items and classes.

For an image x0 and class prompt c_k (Clark & Jaini 2023, eq. 3 and Algorithm 1):

    x_t   = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps,     t_j, eps_j shared by all k
    e_kj  = w(t_j) * mean( (x0 - x0_hat(x_t, c_k, t_j))^2 )      weighting "heuristic"
    w(t)  = exp(-c t),  t = t_index / T
    e_kj  = mean( (eps - eps_hat(x_t, c_k, t_j))^2 )             weighting "uniform"

For an epsilon model the x0 error equals (1 - abar)/abar * ||eps - eps_hat||^2.

Flow-matching models (SD3, FLUX; Lipman et al. 2023, Esser et al. 2024) on the same
shared (t_j, eps_j), with sigma_j = sigmas[t_j] on the model's own shifted grid:

    x_t    = (1 - sigma) x0 + sigma eps,  v = eps - x0,  x0_hat = x_t - sigma v_hat
    e_kj   = exp(-c sigma) * mean( (x0 - x0_hat)^2 )        "heuristic" (sigma plays t)
    e_kj   = mean( (v - v_hat)^2 )                           "velocity": the training loss
    e_kj   = mean( (eps - eps_hat)^2 ), eps_hat = x_t + (1 - sigma) v_hat     "uniform"

so the x0 error is sigma^2 ||v - v_hat||^2. "velocity" on a DDPM model is the error of
v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022).
Pure tensor code: the model, noise generator seeds and config are passed in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from worker.backends.base import Denoiser
from worker.batching import BatchSizer, run_in_batches
from worker.config import ScoringConfig
from worker.noise import draw


@dataclass(frozen=True)
class RoundRequest:
    """One item's share of a round: score ``classes`` on ``n_samples`` new samples."""

    key: str  # item identity; seeds its noise
    x0: torch.Tensor  # (C, H, W), float32, on the model's device
    classes: Sequence[int]  # class indices into the prompt embeddings
    round_index: int
    n_samples: int


def to_x0_eps(out: torch.Tensor, x_t: torch.Tensor, abar: torch.Tensor, prediction_type: str
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Model output -> (x0_hat, eps_hat). Shapes (B, C, H, W); abar (B, 1, 1, 1)."""
    a, s = abar.sqrt(), (1 - abar).sqrt()
    if prediction_type == "epsilon":
        eps_hat = out
        x0_hat = (x_t - s * eps_hat) / a
    elif prediction_type == "v_prediction":
        # v = a eps - s x0  =>  x0 = a x_t - s v,  eps = s x_t + a v  (Salimans & Ho 2022)
        x0_hat = a * x_t - s * out
        eps_hat = s * x_t + a * out
    elif prediction_type == "sample":
        x0_hat = out
        eps_hat = (x_t - a * x0_hat) / s
    else:
        raise ValueError(f"unknown prediction_type {prediction_type!r}")
    return x0_hat, eps_hat


def heuristic_weight(t_index: torch.Tensor, num_timesteps: int, coef: float) -> torch.Tensor:
    """w(t) = exp(-coef * t) with t = t_index / T (Clark & Jaini 2023, appendix)."""
    return torch.exp(-coef * t_index.float() / num_timesteps)


def weighted_errors(out: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, x_t: torch.Tensor,
                    t: torch.Tensor, abar: torch.Tensor, num_timesteps: int, prediction_type: str,
                    config: ScoringConfig) -> torch.Tensor:
    """Per-row weighted error (B,) from raw model output; all float32. abar (B, 1, 1, 1)."""
    x0_hat, eps_hat = to_x0_eps(out.float(), x_t, abar, prediction_type)
    if config.weighting == "uniform":
        return (eps - eps_hat).pow(2).flatten(1).mean(1)
    if config.weighting == "velocity":
        a, s = abar.sqrt(), (1 - abar).sqrt()
        v, v_hat = a * eps - s * x0, a * eps_hat - s * x0_hat
        return (v - v_hat).pow(2).flatten(1).mean(1)
    w = heuristic_weight(t, num_timesteps, config.weight_coef)
    return w * (x0 - x0_hat).pow(2).flatten(1).mean(1)


def flow_to_x0_eps(v_hat: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Velocity output -> (x0_hat, eps_hat): x_t = (1 - sigma) x0 + sigma eps, v = eps - x0.

    x0_hat is the Euler step of FlowMatchEulerDiscreteScheduler from sigma to 0."""
    return x_t - sigma * v_hat, x_t + (1 - sigma) * v_hat


def flow_errors(out: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, x_t: torch.Tensor,
                sigma: torch.Tensor, config: ScoringConfig) -> torch.Tensor:
    """Per-row weighted error (B,) of a flow-matching model's velocity output; float32.
    sigma broadcasts against x0: (B, 1, ...)."""
    v_hat = out.float()
    if config.weighting == "velocity":
        return ((eps - x0) - v_hat).pow(2).flatten(1).mean(1)
    x0_hat, eps_hat = flow_to_x0_eps(v_hat, x_t, sigma)
    if config.weighting == "uniform":
        return (eps - eps_hat).pow(2).flatten(1).mean(1)
    w = torch.exp(-config.weight_coef * sigma.flatten())
    return w * (x0 - x0_hat).pow(2).flatten(1).mean(1)


def score_round(model: Denoiser, requests: Sequence[RoundRequest], cond: torch.Tensor,
                config: ScoringConfig) -> list[np.ndarray]:
    """Score every request; returns one (len(classes), n_samples) float32 array per request
    (the precision the errors are computed in and the job store keeps).

    All (item, class, sample) triples are packed into model calls of up to
    ``config.batch_size`` rows (fewer where the model's ``batch_sizer`` learned that the
    device runs out of memory). ``cond`` is (K, L, D), one embedding per class, or a
    ``Cond`` of K rows. The only host-device synchronisation is the copy of the errors back
    at the end.
    """
    if not requests:
        return []
    schedule = model.schedule
    flow = schedule.is_flow
    abar_all = (schedule.sigmas if flow else schedule.alphas_cumprod).float()  # flow: sigma per t
    T = schedule.num_timesteps
    device = cond.device
    # Rows are (item, class, sample) triples, class-major within an item. Noise is stored
    # once per (item, sample) under shared noise and indexed per row, so memory grows
    # with items x samples, not items x classes x samples.
    eps_parts, t_parts, noise_rows, cls_rows, item_rows, spans = [], [], [], [], [], []
    n_rows = n_noise = 0
    for i, req in enumerate(requests):
        k, n = len(req.classes), req.n_samples
        shape = tuple(req.x0.shape)
        if config.shared_noise:
            t, eps = draw(config.seed, req.key, req.round_index, n, shape, T)
            rows = torch.arange(n).repeat(k)  # row ci * n + j uses noise j
        else:
            draws = [draw(config.seed, req.key, req.round_index, n, shape, T, salt=f"class{c}")
                     for c in req.classes]
            t = torch.cat([d[0] for d in draws])
            eps = torch.cat([d[1] for d in draws])
            rows = torch.arange(k * n)
        t_parts.append(t)
        eps_parts.append(eps)
        noise_rows.append(rows + n_noise)
        n_noise += eps.shape[0]
        cls_rows.append(torch.tensor(list(req.classes), dtype=torch.long).repeat_interleave(n))
        item_rows.append(torch.full((k * n,), i, dtype=torch.long))
        spans.append((n_rows, k, n))
        n_rows += k * n
    t_noise = _to_device(torch.cat(t_parts), device)  # (N_noise,)
    eps_noise = _to_device(torch.cat(eps_parts), device)  # (N_noise, C, H, W)
    noise_all = _to_device(torch.cat(noise_rows), device)  # (N_rows,) -> noise index
    cls_all = _to_device(torch.cat(cls_rows), device)
    item_all = _to_device(torch.cat(item_rows), device)
    x0_items = torch.stack([r.x0 for r in requests]).to(device, torch.float32)  # (I, C, H, W)

    errors = torch.empty(n_rows, dtype=torch.float32, device=device)

    def step(sl: slice) -> None:
        # Inputs are gathered on the device from the round's stored noise: no host work here.
        nz = noise_all[sl]
        t = t_noise[nz]
        eps = eps_noise[nz]
        x0 = x0_items[item_all[sl]]
        if flow:
            sigma = abar_all[t].view(-1, *([1] * (x0.dim() - 1)))
            x_t = (1 - sigma) * x0 + sigma * eps
            out = model.predict(x_t, t, cond[cls_all[sl]])
            errors[sl] = flow_errors(out, x0, eps, x_t, sigma, config)
            return
        abar = abar_all[t].view(-1, 1, 1, 1)
        x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
        out = model.predict(x_t, t, cond[cls_all[sl]])
        errors[sl] = weighted_errors(out, x0, eps, x_t, t, abar, T, schedule.prediction_type, config)

    sizer = getattr(model, "batch_sizer", None) or BatchSizer()
    run_in_batches(n_rows, config.batch_size, sizer, step)
    flat = errors.float().cpu().numpy()  # the round's only host-device sync
    return [flat[s : s + k * n].reshape(k, n) for s, k, n in spans]


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> device; on CUDA through pinned memory, so the copy does not block."""
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)
