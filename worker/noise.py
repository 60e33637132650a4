"""Shared noise and timesteps, reproducible from (seed, item, round).

Every class of an item is scored on the same (t_j, eps_j) in a round (paired samples;
Clark & Jaini 2023, section 3.2). Draws happen on the CPU from a generator seeded by a
hash of (seed, item key, round[, class]), so a round can be recomputed exactly on any
device and a redelivered task writes identical scores.
"""

from __future__ import annotations

import hashlib

import torch


def content_key(data: bytes) -> str:
    """An item's noise identity: a hash of its bytes.

    Keyed by content rather than by path or URI, the same image gets the same noise, and so
    the same scores and label, wherever it lives: `classify` on a folder, a job on that
    folder, or a job on a bucket it was copied to.
    """
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def stream_seed(seed: int, key: str, round_index: int, salt: str = "") -> int:
    """A 63-bit generator seed from (seed, item key, round, salt); stable across runs."""
    h = hashlib.blake2b(f"{seed}\x00{key}\x00{round_index}\x00{salt}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def draw(
    seed: int, key: str, round_index: int, n: int, shape: tuple[int, ...], num_timesteps: int,
    salt: str = "",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (t_index (n,) int64, eps (n, *shape) float32) on the CPU.

    Timesteps are stratified over [0, 1) then shuffled: u_j = (j + U_j) / n, so every
    round spans the whole t range (an ordered prefix would see only small t).
    t_index = floor(u * T).
    """
    g = torch.Generator().manual_seed(stream_seed(seed, key, round_index, salt))
    u = (torch.arange(n, dtype=torch.float64) + torch.rand(n, generator=g, dtype=torch.float64)) / n
    u = u[torch.randperm(n, generator=g)]
    t = (u * num_timesteps).floor().long().clamp_(0, num_timesteps - 1)
    eps = torch.randn((n, *shape), generator=g, dtype=torch.float32)
    return t, eps
