"""Modality adapters: (speech states [B, T, d_in], lengths [B]) -> (speech vectors [B, S, d_llm], lengths).

The trainable part between the frozen speech source and the frozen LLM. Two behind one interface
(`output_lengths`, `forward`); `ADAPTERS` names them for the config (`BlspConfig.adapter_type`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .errors import BlspError
from .whisper import mask_padding


class ConvAdapter(nn.Module):
    """The paper's modality adapter.

    Three Conv1d (kernel 5, stride 2, padding 2), each followed by GLU, downsample 8x
    (50 Hz -> 6.25 Hz); then a residual bottleneck d_llm -> 512 -> d_llm without bias; LayerNorm.
    `downsample` 4 (two convs, 12.5 Hz) gives CTC room for blanks between tokens, which it needs
    to learn fast; with CTC compression the LLM still reads about one vector per token.
    """

    # How each strided convolution runs: "matmul", the windows unfolded and one matrix product
    # (`conv_as_matmul`), or "conv1d", the backend's own (oneDNN, cuDNN). Same numbers. On a
    # 2-core CPU matmul trains ~25% faster at these shapes; on an H100 neither was faster beyond
    # the benchmark's noise (benchmarks/train_step.py --other-conv; README there), so one path.
    conv_impl = "matmul"

    def __init__(self, d_in: int, d_llm: int, bottleneck: int = 512, downsample: int = 8, kernel: int = 5):
        super().__init__()
        n_convs = int(math.log2(downsample))
        if downsample < 2 or 2**n_convs != downsample:
            raise BlspError(f"the conv adapter downsamples by a power of 2 (2, 4, 8, ...), not {downsample}")
        self.kernel, self.stride = kernel, 2
        outs = [d_in] * (n_convs - 1) + [d_llm]
        ins = [d_in] * n_convs
        self.convs = nn.ModuleList(
            nn.Conv1d(i, 2 * o, kernel, stride=self.stride, padding=kernel // 2) for i, o in zip(ins, outs)
        )
        self.fc1 = nn.Linear(d_llm, bottleneck, bias=False)
        self.fc2 = nn.Linear(bottleneck, d_llm, bias=False)
        self.norm = nn.LayerNorm(d_llm)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        for _ in self.convs:
            lengths = (lengths - 1) // self.stride + 1
        return lengths

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for conv in self.convs:
            x = mask_padding(x, lengths)
            y = conv_as_matmul(conv, x) if self.conv_impl == "matmul" else conv(x.transpose(1, 2)).transpose(1, 2)
            x = F.glu(y, dim=-1)
            lengths = (lengths - 1) // self.stride + 1
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.norm(x), lengths


def conv_as_matmul(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """`conv` applied to `x` [B, T, C_in] -> [B, T', C_out]: the same numbers as conv1d, as
    windows of `kernel` frames every `stride` (unfold) times the flattened weight."""
    (k,), (stride,), (pad,) = conv.kernel_size, conv.stride, conv.padding
    windows = F.pad(x, (0, 0, pad, pad)).unfold(1, k, stride).flatten(2)  # [B, T', C_in * k]
    out = torch.addmm(conv.bias, windows.reshape(-1, windows.shape[-1]), conv.weight.flatten(1).T)
    return out.reshape(*windows.shape[:2], -1)


class FrameStackAdapter(nn.Module):
    """Ultravox-style alternative: stack `stack` frames, then a SwiGLU MLP and LayerNorm."""

    def __init__(self, d_in: int, d_llm: int, bottleneck: int = 512, downsample: int = 8):
        super().__init__()
        del bottleneck  # the MLP's hidden width is the LLM's; kept in the signature for one interface
        self.stack = downsample
        self.gate_up = nn.Linear(d_in * downsample, 2 * d_llm)
        self.down = nn.Linear(d_llm, d_llm)
        self.norm = nn.LayerNorm(d_llm)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return (lengths + self.stack - 1) // self.stack

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = mask_padding(x, lengths)
        b, t, d = x.shape
        pad = (-t) % self.stack
        x = F.pad(x, (0, 0, 0, pad)).reshape(b, (t + pad) // self.stack, d * self.stack)
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.norm(self.down(F.silu(gate) * up)), self.output_lengths(lengths)


ADAPTERS = {"conv": ConvAdapter, "stack": FrameStackAdapter}


def check_adapter_type(adapter_type: str) -> None:
    if adapter_type not in ADAPTERS:
        raise BlspError(f"unknown adapter {adapter_type!r}; known: {', '.join(ADAPTERS)}")


def build_adapter(config, d_llm: int) -> nn.Module:
    """The adapter a `BlspConfig` names, from its speech states' width to the LLM's."""
    return ADAPTERS[config.adapter_type](config.encoder_config.d_model, d_llm, config.adapter_bottleneck,
                                         config.adapter_downsample)


@torch.no_grad()
def init_adapter(adapter: nn.Module, seed: int, output_scale: float) -> None:
    """Seeded init whose output starts at `output_scale`, the std of the LLM's token embeddings.

    The LayerNorm gain starts there: a unit-variance speech vector sits far outside the region the
    LLM has ever seen (std 0.136 for SmolLM2 against 1.0). 0: the adapter starts at nothing (a
    correction beside the token bridge).
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in adapter.named_parameters():
        if name.startswith("norm."):
            continue
        if p.dim() > 1:
            fan_in = p[0].numel()
            p.copy_(torch.empty_like(p, device="cpu").uniform_(-1, 1, generator=gen) / math.sqrt(fan_in))
        else:
            p.zero_()
    adapter.norm.weight.fill_(output_scale)
    adapter.norm.bias.zero_()
