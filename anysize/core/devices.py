"""Which torch device to run on when the caller names none."""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    """cuda if present, then Apple's mps, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")
