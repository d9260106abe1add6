"""The CPU's floating-point mode for training and inference."""

from __future__ import annotations

import torch


def flush_denormals() -> bool:
    """Treat subnormal floats (below 1.2e-38) as zero, in this thread and in the threads torch
    starts after it; False where the CPU cannot.

    Why: once the adapter's GLU gates saturate, their gradients fill with subnormal numbers, and
    x86 CPUs take a slow path for each. On a 2-core Intel Xeon the warm start's steps went from
    0.4 s to 3-5 s within 30 steps (the convolutions' backward 10x slower); with this they stay at
    0.4 s. Values that small change nothing a float32 model computes. OpenMP's worker threads
    copy the floating-point mode of the thread that starts them, so this must run before torch's
    first parallel op to reach them all (the command line does it first thing); called later, it
    covers the calling thread only.
    """
    return torch.set_flush_denormal(True)
