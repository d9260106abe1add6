"""Cheap identities of model weights: what a checkpoint names the backbones it was trained against by.

Why: an adapter is meaningless on another encoder or LLM, and a checkpoint holds only the adapter.
Hashing every weight of a 7B LLM would take seconds; a strided sample of each tensor, rounded to
bfloat16, takes milliseconds and agrees whether the same weights were loaded in fp32 or bf16.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from .errors import BlspError

SAMPLES_PER_TENSOR = 4096


def weights_fingerprint(module: nn.Module, samples_per_tensor: int = SAMPLES_PER_TENSOR) -> str:
    """Every tensor's name and shape and a strided sample of its values, hashed."""
    return tensors_fingerprint(sorted(module.state_dict().items()), samples_per_tensor)


def checkpoint_fingerprint(path: str | Path, samples_per_tensor: int = SAMPLES_PER_TENSOR) -> str:
    """`weights_fingerprint` of a saved model's safetensors files, without building the model
    (for a backend that loads the weights itself, such as vLLM)."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise BlspError(f"{path}: no *.safetensors weights to fingerprint")
    handles = [safe_open(str(f), framework="pt") for f in files]
    names = sorted(((name, h) for h in handles for name in h.keys()), key=lambda pair: pair[0])
    return tensors_fingerprint(((name, h.get_tensor(name)) for name, h in names), samples_per_tensor)


def tensors_fingerprint(named_tensors, samples_per_tensor: int = SAMPLES_PER_TENSOR) -> str:
    h = hashlib.sha256()
    for name, tensor in named_tensors:
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::step][:samples_per_tensor].to("cpu", torch.float32).to(torch.bfloat16)
        h.update(f"{name}:{tuple(tensor.shape)}".encode())
        h.update(sample.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]
