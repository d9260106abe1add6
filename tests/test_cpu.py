"""The CPU's floating-point mode: subnormal numbers flushed to zero."""

from __future__ import annotations

import torch

from blsp.cpu import flush_denormals


def test_flushing_denormals_turns_a_subnormal_product_into_zero():
    tiny, scale = torch.tensor([1e-30]), torch.tensor([1e-10])
    torch.set_flush_denormal(False)
    try:
        assert (tiny * scale).item() > 0  # 1e-40: a subnormal float32
        assert flush_denormals()
        assert (tiny * scale).item() == 0.0
        assert (tiny * 1e5).item() > 0  # normal numbers are untouched
    finally:
        flush_denormals()
