"""The adapters (blsp.adapters): output lengths, batch invariance, the convolution as a matrix product."""

from __future__ import annotations

import pytest
import torch

from blsp.adapters import ConvAdapter, FrameStackAdapter
from blsp.errors import BlspError


def test_conv_adapter_output_lengths_follow_the_formula():
    adapter = ConvAdapter(16, 24, bottleneck=8)
    for length in [1, 2, 7, 8, 9, 50, 251]:
        expected = length
        for _ in range(3):
            expected = (expected - 1) // 2 + 1
        out, lengths = adapter(torch.randn(1, length, 16), torch.tensor([length]))
        assert out.shape == (1, expected, 24)
        assert int(lengths) == expected == int(adapter.output_lengths(torch.tensor(length)))


def test_conv_adapter_parameter_count_matches_the_paper_scale():
    # Whisper-small (768) into a 4096-wide LLM: "about 47 M parameters" (the paper's 7B setting).
    adapter = ConvAdapter(768, 4096)
    n = sum(p.numel() for p in adapter.parameters())
    assert 47_000_000 < n < 48_000_000


@pytest.mark.parametrize("cls", [ConvAdapter, FrameStackAdapter])
def test_adapter_output_does_not_depend_on_batch_padding(cls):
    torch.manual_seed(0)
    adapter = cls(16, 24, 8).eval()
    clips = [torch.randn(n, 16) for n in (37, 80, 5)]
    batch = torch.zeros(3, 80, 16)
    for i, c in enumerate(clips):
        batch[i, : len(c)] = c
    out, lengths = adapter(batch, torch.tensor([37, 80, 5]))
    for i, c in enumerate(clips):
        alone, n = adapter(c[None], torch.tensor([len(c)]))
        torch.testing.assert_close(out[i, : int(lengths[i])], alone[0], rtol=1e-5, atol=1e-5)
        assert int(n) == int(lengths[i])


@pytest.mark.parametrize("downsample", [2, 4, 8, 16])
def test_conv_adapter_downsamples_by_its_factor(downsample):
    adapter = ConvAdapter(16, 24, bottleneck=8, downsample=downsample)
    assert len(adapter.convs) == {2: 1, 4: 2, 8: 3, 16: 4}[downsample]
    out, lengths = adapter(torch.randn(1, 160, 16), torch.tensor([160]))
    assert out.shape[1] == int(lengths) == 160 // downsample


@pytest.mark.parametrize("frames", [1, 7, 40])
def test_the_cpu_convolution_as_a_matrix_product_equals_conv1d_with_its_gradients(frames):
    from blsp.adapters import conv_as_matmul as _conv_as_matmul

    torch.manual_seed(0)
    conv = torch.nn.Conv1d(6, 10, 5, stride=2, padding=2)
    x = torch.randn(3, frames, 6, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    got, want = _conv_as_matmul(conv, x), conv(x_ref.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(got, want)
    weights = torch.randn_like(want)
    (got * weights).sum().backward()
    grads = [conv.weight.grad.clone(), conv.bias.grad.clone()]
    conv.zero_grad()
    (want * weights).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(grads, [conv.weight.grad, conv.bias.grad])


def test_conv_adapter_refuses_a_factor_that_is_not_a_power_of_two():
    with pytest.raises(BlspError, match="power of 2"):
        ConvAdapter(16, 24, downsample=6)


# ----------------------------------------------------------------------------------------------
# The shared prompt prefix, computed once
# ----------------------------------------------------------------------------------------------
def test_the_adapter_gives_the_same_vectors_with_either_convolution(monkeypatch):
    torch.manual_seed(0)
    adapter = ConvAdapter(16, 24, bottleneck=8, downsample=4)
    x, lengths = torch.randn(3, 37, 16), torch.tensor([37, 20, 3])
    want, want_lengths = adapter(x, lengths)
    monkeypatch.setattr(ConvAdapter, "conv_impl", "conv1d")
    got, got_lengths = adapter(x, lengths)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert got_lengths.tolist() == want_lengths.tolist() == [10, 5, 1]


# ----------------------------------------------------------------------------------------------
# Speech states "decoder": the adapter reads Whisper's decoder states along its transcript
# ----------------------------------------------------------------------------------------------
