"""Torch global state, set once where a worker process starts."""

from __future__ import annotations


def configure(threads: int | None = None) -> None:
    import torch

    torch.set_grad_enabled(False)
    if threads:
        torch.set_num_threads(threads)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
