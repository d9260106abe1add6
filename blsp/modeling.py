"""The BLSP model: a frozen Whisper encoder, a small trainable adapter, a frozen causal LLM.

Named parts as in transformers' audio-LLMs (qwen2_audio, voxtral):
`audio_tower` (Whisper encoder) -> `adapter` (the paper's modality adapter) -> `language_model`.
With `speech_states="decoder"` a frozen `speech_decoder` (Whisper's own decoder) sits between the
encoder and the adapter: the adapter then reads its hidden states along its greedy transcript.

Speech enters the LLM by `masked_scatter` into the embedded prompt at positions whose input id is
`SPEECH_TOKEN_ID`, a negative sentinel no vocabulary uses (as LLaVA's IMAGE_TOKEN_INDEX).
A checkpoint holds only the adapter, plus the names and weight fingerprints of the encoder and
LLM it was trained against.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel
from transformers.models.whisper.modeling_whisper import WhisperDecoder, WhisperEncoder

from .errors import BlspError, CheckpointError, SpeechStatesError
from .bridge import TokenBridge, bridge_pieces, bridge_table, pieces_fingerprint
from .losses import EmbeddingCTCHead
from .lora import (LoraGate, LoraSettings, add_lora, load_lora_state_dict, lora_parameters, lora_state_dict,
                   set_lora_dropout)
from .sharding import is_sharded

SPEECH_TOKEN_ID = -200
IGNORE_INDEX = -100
ADAPTER_WEIGHTS = "adapter.safetensors"
CTC_HEAD_PREFIX = "ctc_head."
LORA_PREFIX = "lora."
ENCODER_PREFIX = "audio_tower."  # the encoder's trained top layers, when there are any
PREFIX_CACHE_SIZE = 4  # shared prompt prefixes whose keys and values are kept (see _prefix_cache)

# What the adapter reads (BlspConfig.speech_states): "encoder", the encoder's frames at 50 Hz (the
# paper); "decoder", the hidden states of Whisper's own decoder along its greedy transcript, one per
# token (as DeSTA2 reads Whisper's decoder): the words as Whisper recognised them, where an adapter
# trained on a few thousand clips recognises them poorly (docs/warm_start_probe.md).
SPEECH_STATES = ("encoder", "decoder")
# Whisper was trained on 30 s windows, speech then silence; given the speech alone it loops. The
# decoder reads the clip followed by as much silence again, in a window of at least 5 s (at most the
# 30 s one): on the demo's first 40 held-out clips 17% WER against 18% for the full window, at a
# quarter of its cost (673% unpadded); with twice the clip and no 5 s floor, 5 of the 16 shortest
# training clips (1.3-1.6 s) looped.
DECODER_CONTEXT = 2
DECODER_MIN_FRAMES = 500  # log-mel frames (100 a second)
WHISPER_WINDOW_FRAMES = 3000  # log-mel frames in Whisper's 30 s window
# Tokens decoded at most: as openai/whisper's sample_len (half the decoder's 448 positions), and
# 10 a second of speech (English runs at ~4), so that a clip Whisper loops on stops early.
DECODER_MAX_TOKENS = 224
DECODER_TOKENS_PER_SECOND = 10


# ----------------------------------------------------------------------------------------------
# Adapters: (encoder frames [B, T, d_enc], lengths [B]) -> (speech vectors [B, S, d_llm], lengths)
# ----------------------------------------------------------------------------------------------
def attention_kernels():
    """Scaled-dot-product attention without cuDNN's kernel (it only exists on a GPU).

    cuDNN's attention builds an execution plan for every new shape, ~5 ms of CPU time in the
    forward and again in the backward of each layer (measured on an H100, torch 2.11): step 2's
    batches change length every step, so a 1B LLM's step took 0.36 s where the same work with a
    cached plan took 0.13 s. Flash and memory-efficient attention need no plan.
    """
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _mask_padding(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Zero frames past each length ([B, T, C]) so convolutions see exactly what an unbatched,
    zero-padded clip would: batching then never changes a clip's output."""
    keep = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
    return x * keep[..., None].to(x.dtype)


class ConvAdapter(nn.Module):
    """The paper's modality adapter.

    Three Conv1d (kernel 5, stride 2, padding 2), each followed by GLU, downsample 8x
    (50 Hz -> 6.25 Hz); then a residual bottleneck d_llm -> 512 -> d_llm without bias; LayerNorm.
    `downsample` 4 (two convs, 12.5 Hz) gives CTC room for blanks between tokens, which it needs
    to learn fast; with CTC compression the LLM still reads about one vector per token.
    """

    # How each strided convolution runs: "matmul", the windows unfolded and one matrix product
    # (`_conv_as_matmul`), or "conv1d", the backend's own (oneDNN, cuDNN). Same numbers. On a
    # 2-core CPU matmul trains ~25% faster at these shapes; on an H100 neither was faster beyond
    # the benchmark's noise (benchmarks/train_step.py --other-conv; README there), so one path.
    conv_impl = "matmul"

    def __init__(self, d_enc: int, d_llm: int, bottleneck: int = 512, downsample: int = 8, kernel: int = 5):
        super().__init__()
        n_convs = int(math.log2(downsample))
        if downsample < 2 or 2**n_convs != downsample:
            raise BlspError(f"the conv adapter downsamples by a power of 2 (2, 4, 8, ...), not {downsample}")
        self.kernel, self.stride = kernel, 2
        outs = [d_enc] * (n_convs - 1) + [d_llm]
        ins = [d_enc] * n_convs
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
            x = _mask_padding(x, lengths)
            y = _conv_as_matmul(conv, x) if self.conv_impl == "matmul" else conv(x.transpose(1, 2)).transpose(1, 2)
            x = F.glu(y, dim=-1)
            lengths = (lengths - 1) // self.stride + 1
        x = x + self.fc2(F.gelu(self.fc1(x)))
        return self.norm(x), lengths


def _conv_as_matmul(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    """`conv` applied to `x` [B, T, C_in] -> [B, T', C_out]: the same numbers as conv1d, as
    windows of `kernel` frames every `stride` (unfold) times the flattened weight."""
    (k,), (stride,), (pad,) = conv.kernel_size, conv.stride, conv.padding
    windows = F.pad(x, (0, 0, pad, pad)).unfold(1, k, stride).flatten(2)  # [B, T', C_in * k]
    out = torch.addmm(conv.bias, windows.reshape(-1, windows.shape[-1]), conv.weight.flatten(1).T)
    return out.reshape(*windows.shape[:2], -1)


class FrameStackAdapter(nn.Module):
    """Ultravox-style alternative: stack `stack` frames, then a SwiGLU MLP and LayerNorm."""

    def __init__(self, d_enc: int, d_llm: int, bottleneck: int = 512, downsample: int = 8):
        super().__init__()
        del bottleneck  # the MLP's hidden width is the LLM's; kept in the signature for one interface
        self.stack = downsample
        self.gate_up = nn.Linear(d_enc * downsample, 2 * d_llm)
        self.down = nn.Linear(d_llm, d_llm)
        self.norm = nn.LayerNorm(d_llm)

    def output_lengths(self, lengths: torch.Tensor) -> torch.Tensor:
        return (lengths + self.stack - 1) // self.stack

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = _mask_padding(x, lengths)
        b, t, d = x.shape
        pad = (-t) % self.stack
        x = F.pad(x, (0, 0, 0, pad)).reshape(b, (t + pad) // self.stack, d * self.stack)
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.norm(self.down(F.silu(gate) * up)), self.output_lengths(lengths)


ADAPTERS = {"conv": ConvAdapter, "stack": FrameStackAdapter}


def build_adapter(config: "BlspConfig", d_llm: int) -> nn.Module:
    return ADAPTERS[config.adapter_type](config.encoder_config.d_model, d_llm, config.adapter_bottleneck,
                                         config.adapter_downsample)


COMPRESSIONS = (None, "ctc")
SPEECH_VECTORS = ("adapter", "tokens")


def check_speech_states(speech_states: str) -> None:
    if speech_states not in SPEECH_STATES:
        raise BlspError(f"unknown speech states {speech_states!r}; known: {', '.join(SPEECH_STATES)}")


def check_bridge_adapter(adapter_type: str, downsample: int) -> None:
    """The token bridge gives one vector per decoder state, and the adapter's correction is added to
    each: it must keep the states' number (the stack adapter over one state)."""
    if adapter_type != "stack" or downsample != 1:
        raise BlspError(f"the token bridge (speech vectors 'tokens' on decoder states) adds the adapter's vector to each "
                        f"state's: use --adapter stack --adapter-downsample 1, not --adapter {adapter_type} "
                        f"--adapter-downsample {downsample} (--recipe decoder sets them)")


def initial_speech_vectors(speech_states: str, speech_vectors: str) -> str:
    """The speech vectors a new model is built with: over decoder states the token bridge needs no
    training; over encoder frames token-run vectors need the CTC head training enables later."""
    return speech_vectors if speech_states == "decoder" else "adapter"


def check_speech_vectors(speech_vectors: str, speech_compression: str | None, speech_states: str = "encoder") -> None:
    if speech_vectors not in SPEECH_VECTORS:
        raise BlspError(f"unknown speech vectors {speech_vectors!r}; known: {', '.join(SPEECH_VECTORS)}")
    if speech_vectors == "tokens" and speech_compression != "ctc" and speech_states != "decoder":
        raise BlspError("speech vectors 'tokens' are read through the CTC head or Whisper's decoder: they need "
                        "speech compression 'ctc' or speech states 'decoder'")


def ctc_compress(x: torch.Tensor, lengths: torch.Tensor, log_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Collapse speech vectors the way a CTC decode collapses frames into tokens.

    Frames the head reads as blank are dropped; each run of frames read as the same token
    becomes one vector, the run's mean, at the run's first frame. Returns the vectors and a
    keep mask [B, S]: the caller hides the other frames from the LLM (attention mask 0, no
    position), so the LLM reads about one vector per spoken token, as it reads text. Every clip
    keeps at least its least-blank frame. Why: a frozen LLM reads a sequence shaped like its
    own embedded text far more easily than 6.25 vectors a second with blanks between the words
    (Speech-LLaMA's CTC compressor; Wu et al., 2023).
    """
    b, s, d = x.shape
    valid = torch.arange(s, device=x.device)[None, :] < lengths[:, None]
    labels = log_probs.argmax(-1)
    nonblank = (labels != 0) & valid
    prev_label = F.pad(labels[:, :-1], (1, 0), value=-1)
    prev_nonblank = F.pad(nonblank[:, :-1], (1, 0), value=False)
    start = nonblank & ~(prev_nonblank & (labels == prev_label))
    empty = ~start.any(1) & (lengths > 0)
    if empty.any():
        least_blank = log_probs[..., 0].masked_fill(~valid, float("inf")).argmin(1)
        rows = empty.nonzero().squeeze(1)
        start[rows, least_blank[rows]] = True
        nonblank[rows, least_blank[rows]] = True
    run = (start.long().cumsum(1) - 1).clamp(min=0)  # the run each frame belongs to
    member = (nonblank & (start.long().cumsum(1) > 0)).to(x.dtype)[..., None]
    index = run[..., None].expand(-1, -1, d)
    sums = torch.zeros_like(x).scatter_add(1, index, x * member)
    counts = torch.zeros(b, s, 1, dtype=x.dtype, device=x.device).scatter_add(1, run[..., None], member)
    means = (sums / counts.clamp(min=1)).gather(1, index)
    return torch.where(start[..., None], means, x), start


# ----------------------------------------------------------------------------------------------
# The frozen encoder on the clip's actual length
# ----------------------------------------------------------------------------------------------
def decoder_window(mel_length: int) -> int:
    """Log-mel frames of the window Whisper's decoder reads a clip of `mel_length` frames in: twice
    the clip, rounded up to whole seconds (so clips of similar length share a batch), 5-30 s."""
    frames = -(-mel_length * DECODER_CONTEXT // 100) * 100
    return min(max(frames, DECODER_MIN_FRAMES), WHISPER_WINDOW_FRAMES)


def decoder_token_limit(mel_length: int) -> int:
    """The most steps Whisper's decoder takes on a clip of `mel_length` frames."""
    return min(DECODER_MAX_TOKENS, DECODER_TOKENS_PER_SECOND * (mel_length // 100 + 1))


def with_silence(mel: torch.Tensor, mel_lengths: torch.Tensor, width: int) -> torch.Tensor:
    """Each clip's log-mel [B, n_mels, T] followed by the log-mel of digital silence, `width` frames
    in all. Whisper's log-mel floors every value at the clip's maximum less 8 (log10), and scales
    by (x + 4) / 4: silence is the clip's maximum less 2 (blsp.audio.log_mel_spectrogram)."""
    valid = torch.arange(mel.shape[-1], device=mel.device)[None, :] < mel_lengths[:, None]
    peak = mel.masked_fill(~valid[:, None, :], -torch.inf).amax(dim=(1, 2))
    out = (peak - 2.0)[:, None, None].expand(mel.shape[0], mel.shape[1], width).clone()
    keep = min(width, mel.shape[-1])
    out[..., :keep] = torch.where(valid[:, None, :keep], mel[..., :keep], out[..., :keep])
    return out


def encoder_output_lengths(mel_lengths: torch.Tensor) -> torch.Tensor:
    """Whisper's conv2 has stride 2: 100 mel frames a second become 50 encoder frames."""
    return (mel_lengths - 1) // 2 + 1


def run_whisper_encoder(
    encoder: WhisperEncoder, mel: torch.Tensor, mel_lengths: torch.Tensor, stop: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whisper's encoder without the 30 s padding HF insists on.

    Slices the positional embedding to the actual length (most of the original's training time
    went into encoding padding). Padded frames are zeroed before each conv and masked as keys in
    attention, so a clip's frames do not depend on what it was batched with.
    `mel`: [B, n_mels, T] (T <= 3000), `mel_lengths`: [B]. Returns ([B, T', d], lengths).
    `stop`: run only the layers before it and return their hidden state (no final norm): the
    frozen part of an encoder whose top layers train (`run_whisper_top` runs the rest).
    """
    if mel.shape[-1] > encoder.config.max_source_positions * 2:
        raise ValueError("mel input longer than 30 s: split it first (blsp.audio.split_for_encoder)")
    x = _mask_padding(mel.transpose(1, 2), mel_lengths).transpose(1, 2)
    x = F.gelu(encoder.conv1(x))
    x = _mask_padding(x.transpose(1, 2), mel_lengths).transpose(1, 2)
    x = F.gelu(encoder.conv2(x)).transpose(1, 2)
    lengths = encoder_output_lengths(mel_lengths)
    x = x + encoder.embed_positions.weight[: x.shape[1]].to(x.dtype)
    x = run_whisper_layers(encoder, x, lengths, 0, stop)
    return (x if stop is not None else encoder.layer_norm(x)), lengths


def run_whisper_top(encoder: WhisperEncoder, hidden: torch.Tensor, lengths: torch.Tensor,
                    start: int) -> torch.Tensor:
    """The encoder's layers from `start` on and its final norm, over the hidden state before them."""
    return encoder.layer_norm(run_whisper_layers(encoder, hidden, lengths, start, None))


def run_whisper_layers(encoder: WhisperEncoder, x: torch.Tensor, lengths: torch.Tensor, start: int,
                       stop: int | None) -> torch.Tensor:
    keep = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]
    mask = torch.zeros(keep.shape, dtype=x.dtype, device=x.device)
    mask = mask.masked_fill(~keep, torch.finfo(x.dtype).min)[:, None, None, :]
    for layer in encoder.layers[start:stop]:
        x = layer(x, mask)
        x = x[0] if isinstance(x, tuple) else x
    return x


# ----------------------------------------------------------------------------------------------
# Config and model
# ----------------------------------------------------------------------------------------------
def _as_config(value: Any) -> PretrainedConfig | None:
    if value is None or isinstance(value, PretrainedConfig):
        return value
    value = dict(value)
    return AutoConfig.for_model(value.pop("model_type"), **value)


class BlspConfig(PretrainedConfig):
    """Nests the encoder's and the LLM's configs; names and fingerprints them."""

    model_type = "blsp"

    def __init__(
        self,
        encoder_config: Any = None,
        llm_config: Any = None,
        adapter_type: str = "conv",
        adapter_bottleneck: int = 512,
        adapter_downsample: int = 8,
        encoder_name: str | None = None,
        llm_name: str | None = None,
        encoder_fingerprint: str | None = None,
        llm_fingerprint: str | None = None,
        system_prompt: str | None = None,
        speech_compression: str | None = None,
        ctc_vocab: list[int] | None = None,
        speech_vectors: str = "adapter",
        lora: dict | None = None,
        encoder_trainable_layers: int = 0,
        speech_states: str = "encoder",
        decoder_ids: dict | None = None,
        decoder_fingerprint: str | None = None,
        speech_language: str | None = None,
        bridge_fingerprint: str | None = None,
        **kwargs: Any,
    ):
        self.encoder_config = _as_config(encoder_config)
        self.llm_config = _as_config(llm_config)
        if adapter_type not in ADAPTERS:
            raise BlspError(f"unknown adapter {adapter_type!r}; known: {', '.join(ADAPTERS)}")
        self.adapter_type = adapter_type
        self.adapter_bottleneck = adapter_bottleneck
        self.adapter_downsample = adapter_downsample  # encoder frames (50 Hz) per speech vector
        self.encoder_name, self.llm_name = encoder_name, llm_name
        self.encoder_fingerprint, self.llm_fingerprint = encoder_fingerprint, llm_fingerprint
        self.system_prompt = system_prompt
        if speech_compression not in COMPRESSIONS:
            raise BlspError(f"unknown speech compression {speech_compression!r}; known: ctc")
        # "ctc": the CTC head over `ctc_vocab` (LLM token ids) decides which speech vectors the
        # LLM sees (see `ctc_compress`); None: it sees all of them, as in the paper.
        self.speech_compression, self.ctc_vocab = speech_compression, ctc_vocab
        check_speech_vectors(speech_vectors, speech_compression, speech_states)
        # "adapter": the LLM reads the adapter's vectors (the paper); "tokens": each CTC token run
        # becomes the mix of the LLM's own token embeddings that the head's posterior gives it, or
        # with speech states "decoder" each decoder state the mix of the LLM embeddings of Whisper's
        # likeliest tokens (blsp.bridge), plus the adapter's vector as a learned correction.
        self.speech_vectors = speech_vectors
        # LoRA on the LLM (blsp.lora.LoraSettings as a dict), or None: the LLM frozen, as in the paper.
        self.lora = dict(lora) if lora else None
        # The encoder's top N layers (and its final norm) train with the adapter; 0: all frozen (the paper).
        self.encoder_trainable_layers = encoder_trainable_layers
        check_speech_states(speech_states)
        if speech_states == "decoder" and not decoder_ids:
            raise BlspError("speech states 'decoder' need Whisper's decoding ids (blsp.whisper.decoding_ids)")
        # "decoder": what Whisper's decoder is prompted and stopped with (its tokenizer's ids, kept
        # here so that a saved model decodes without it) and the fingerprint of its weights.
        if speech_states == "decoder" and speech_vectors == "tokens":
            check_bridge_adapter(adapter_type, adapter_downsample)
        self.speech_states = speech_states
        self.decoder_ids = dict(decoder_ids) if decoder_ids else None
        self.decoder_fingerprint = decoder_fingerprint
        # "decoder": the language Whisper transcribes in ("en", ...), or "auto": its guess per clip
        self.speech_language = speech_language
        self.bridge_fingerprint = bridge_fingerprint  # which LLM tokens stand for each of Whisper's (blsp.bridge)
        super().__init__(**kwargs)

    @property
    def first_trainable_encoder_layer(self) -> int | None:
        """The encoder layer from which on it trains, or None when it is frozen whole."""
        n = self.encoder_trainable_layers
        return self.encoder_config.encoder_layers - n if n else None

    @property
    def feature_key(self) -> str | None:
        """What cached features are keyed by: the frozen encoder's fingerprint, and with trained top
        layers the layer whose input they hold (the frozen part's output)."""
        first = self.first_trainable_encoder_layer
        if self.encoder_fingerprint is None:
            return None
        if self.speech_states == "decoder":  # the decoder's states: its weights, prompt and window decide them
            how = [self.decoder_ids, "window per clip, text-token states", DECODER_CONTEXT, DECODER_MIN_FRAMES, DECODER_MAX_TOKENS,
                   DECODER_TOKENS_PER_SECOND]
            decoding = hashlib.sha1(json.dumps(how, sort_keys=True).encode()).hexdigest()[:8]
            return f"{self.encoder_fingerprint}-decoder-{self.decoder_fingerprint}-{decoding}"
        if first is None:
            return self.encoder_fingerprint
        return f"{self.encoder_fingerprint}-below-layer{first}"

    @property
    def reads_token_bridge(self) -> bool:
        """Whether the LLM reads decoder states through the token bridge (blsp.bridge)."""
        return self.speech_states == "decoder" and self.speech_vectors == "tokens"

    def to_dict(self) -> dict:
        out = super().to_dict()
        for key in ("encoder_config", "llm_config"):
            if isinstance(getattr(self, key), PretrainedConfig):
                out[key] = getattr(self, key).to_dict()
        return out


def weights_fingerprint(module: nn.Module, samples_per_tensor: int = 4096) -> str:
    """A cheap, dtype-robust identity of a model's weights.

    Hashes every tensor's name and shape and a strided sample of its values rounded to bfloat16,
    so a 7B LLM is fingerprinted in milliseconds and the same weights loaded in fp32 or bf16
    agree.
    """
    return tensors_fingerprint(sorted(module.state_dict().items()), samples_per_tensor)


def checkpoint_fingerprint(path: str | Path, samples_per_tensor: int = 4096) -> str:
    """`weights_fingerprint` of a saved model's safetensors files, without building the model
    (for a backend that loads the weights itself, such as vLLM)."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise BlspError(f"{path}: no *.safetensors weights to fingerprint")
    handles = [safe_open(str(f), framework="pt") for f in files]
    names = sorted(((name, h) for h in handles for name in h.keys()), key=lambda pair: pair[0])
    return tensors_fingerprint(((name, h.get_tensor(name)) for name, h in names), samples_per_tensor)


def tensors_fingerprint(named_tensors, samples_per_tensor: int = 4096) -> str:
    h = hashlib.sha256()
    for name, tensor in named_tensors:
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // samples_per_tensor)
        sample = flat[::step][:samples_per_tensor].to("cpu", torch.float32).to(torch.bfloat16)
        h.update(f"{name}:{tuple(tensor.shape)}".encode())
        h.update(sample.view(torch.int16).numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class BlspOutput:
    loss: torch.Tensor | None = None  # mean over target tokens
    loss_sum: torch.Tensor | None = None
    n_tokens: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # [B, T, V] only when asked for
    target_logits: torch.Tensor | None = None  # [N, V] at the N scored positions, when asked for
    speech: tuple[torch.Tensor, torch.Tensor] | None = None  # the adapter's output and lengths


def shared_prefix(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor | None = None) -> list[int]:
    """The token ids every row of a right-padded batch opens with, up to the first speech slot
    and, given `labels`, short of the first position whose hidden state predicts one (a prefix's
    hidden states are not computed): a batch of one text-only row is not all prefix."""
    same = (input_ids == input_ids[:1]).all(0) & (attention_mask == 1).all(0) & (input_ids[0] != SPEECH_TOKEN_ID)
    if labels is not None:
        same[:-1] &= (labels[:, 1:] == IGNORE_INDEX).all(0)
        same[-1] = False
    n = int(same.long().cumprod(0).sum())
    return input_ids[0, :n].tolist()


def _checkpointed(forward, model: "BlspModel"):
    """`forward` under a non-reentrant activation checkpoint whenever a graph is being built."""

    def run(*args: Any, **kwargs: Any):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        # The recomputation runs in the backward pass, outside the forward's attention_kernels()
        # and outside the LoRA positions it was given: both are restored for it.
        gate = model.lora_gate
        state = gate.state() if gate is not None else None

        @contextlib.contextmanager
        def recompute_context():
            with attention_kernels(), gate.restored(state) if gate is not None else contextlib.nullcontext():
                yield

        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs,
                                                 context_fn=lambda: (contextlib.nullcontext(), recompute_context()))

    return run


try:
    from transformers.cache_utils import DynamicLayer
except ImportError:  # an older transformers: the prefix cache then keeps its own layers
    DynamicLayer = None

if DynamicLayer is None:
    _ReadOnlyKV = type(None)  # matches no cache layer
else:

    class _ReadOnlyKV(DynamicLayer):
        """A layer of the shared-prefix cache that returns prefix + new keys without storing them.

        Nothing reads the cache after a training forward, and a layer recomputed under
        activation checkpointing must not append its keys a second time."""

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


def _hide_dropped_speech(attention_mask: torch.Tensor, input_ids: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Mask the speech slots whose vectors compression dropped (`keep` flags, in slot order)."""
    if keep is None:
        return attention_mask
    attention_mask = attention_mask.clone()
    attention_mask[input_ids == SPEECH_TOKEN_ID] = keep.to(attention_mask.dtype)
    return attention_mask


class BlspModel(PreTrainedModel):
    config_class = BlspConfig
    base_model_prefix = "blsp"
    main_input_name = "input_ids"
    _supports_sdpa = True

    def __init__(
        self,
        config: BlspConfig,
        audio_tower: WhisperEncoder | None = None,
        language_model: PreTrainedModel | None = None,
        speech_decoder: WhisperDecoder | None = None,
    ):
        super().__init__(config)
        self.audio_tower = audio_tower if audio_tower is not None else WhisperEncoder(config.encoder_config)
        self.speech_decoder: WhisperDecoder | None = None
        if config.speech_states == "decoder":
            self.speech_decoder = speech_decoder if speech_decoder is not None else WhisperDecoder(config.encoder_config)
        self.token_bridge: TokenBridge | None = None  # built from the tokenizers: build_token_bridge
        self.language_model = (
            language_model if language_model is not None else AutoModelForCausalLM.from_config(config.llm_config)
        )
        self.adapter = build_adapter(config, self.language_model.get_input_embeddings().embedding_dim)
        self.ctc_head: EmbeddingCTCHead | None = None
        if config.speech_compression == "ctc":
            self.ctc_head = EmbeddingCTCHead(self.language_model.get_input_embeddings().weight, config.ctc_vocab)
        self.lora_gate: LoraGate | None = None
        if config.lora:
            self.lora_gate = add_lora(self.language_model, LoraSettings(**config.lora))
        self.processor = None  # a BlspProcessor, attached by the loaders
        self._prefix_kv: OrderedDict = OrderedDict()  # see llm_hidden_states(shared_prefix=...)
        self.freeze_backbones()

    def _init_weights(self, module: nn.Module) -> None:
        # Sub-models come pretrained; the adapter keeps torch's default init (see init_adapter).
        pass

    # -- construction --------------------------------------------------------------------------
    def freeze_backbones(self) -> None:
        for part in (self.audio_tower, self.speech_decoder, self.language_model):
            if part is None:
                continue
            part.requires_grad_(False)
            part.eval()
        for p in lora_parameters(self.language_model):  # the LLM's only trainable weights
            p.requires_grad_(True)
        set_lora_dropout(self.language_model, self.training)
        for p in self.trainable_encoder_parameters():
            p.requires_grad_(True)

    def trainable_encoder_parameters(self) -> list[nn.Parameter]:
        """The encoder's top layers and final norm, when they train (`unfreeze_encoder_layers`)."""
        first = self.config.first_trainable_encoder_layer
        if first is None:
            return []
        return [p for part in (*self.audio_tower.layers[first:], self.audio_tower.layer_norm) for p in part.parameters()]

    def unfreeze_encoder_layers(self, n: int) -> None:
        """Train the encoder's top `n` layers with the adapter; features are then cached below them."""
        layers = self.config.encoder_config.encoder_layers
        if n and self.speech_decoder is not None:
            raise BlspError("--unfreeze-encoder-layers: not with --speech-states decoder (the adapter reads the "
                            "decoder's states of a greedy transcript, which no gradient reaches)")
        if not 0 <= n <= layers:
            raise BlspError(f"--unfreeze-encoder-layers {n}: the encoder has {layers} layers")
        self.config.encoder_trainable_layers = n
        self.freeze_backbones()

    def train(self, mode: bool = True) -> "BlspModel":
        # Frozen parts stay in eval mode (no dropout) whatever the trainer asks.
        super().train(mode)
        self.freeze_backbones()
        return self

    @torch.no_grad()
    def init_adapter(self, seed: int = 0) -> None:
        """Seeded adapter init whose output starts at the scale of the LLM's token embeddings.

        The LayerNorm gain starts at the embedding matrix's std: a unit-variance speech vector
        sits far outside the region the LLM has ever seen (std 0.136 for SmolLM2 against 1.0).
        """
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.adapter.named_parameters():
            if name.startswith("norm."):
                continue
            if p.dim() > 1:
                fan_in = p[0].numel()
                p.copy_(torch.empty_like(p, device="cpu").uniform_(-1, 1, generator=gen) / math.sqrt(fan_in))
            else:
                p.zero_()
        emb_std = self.language_model.get_input_embeddings().weight.float().std().item()
        # Beside the token bridge the adapter is a correction: it starts at nothing.
        self.adapter.norm.weight.fill_(0.0 if self.reads_token_bridge else emb_std)
        self.adapter.norm.bias.zero_()

    def enable_ctc_compression(self, vocab: list[int], speech_vectors: str = "adapter") -> None:
        """Give the model a CTC head over `vocab` that compresses its speech (`ctc_compress`);
        `speech_vectors` "tokens": the LLM reads the head's token-embedding mixes instead."""
        check_speech_vectors(speech_vectors, "ctc")
        weight = self.language_model.get_input_embeddings().weight
        self.config.speech_compression, self.config.ctc_vocab = "ctc", [int(t) for t in vocab]
        self.config.speech_vectors = speech_vectors
        self.ctc_head = EmbeddingCTCHead(weight, self.config.ctc_vocab).to(weight.device)

    @property
    def reads_token_bridge(self) -> bool:
        return self.config.reads_token_bridge

    def build_token_bridge(self, whisper_tokenizer: Any, strict: bool = True) -> None:
        """The bridge from Whisper's decoder states to the LLM's token embeddings (blsp.bridge),
        from Whisper's tokenizer and the LLM's (attach_processor first). A saved model's bridge
        must map Whisper's tokens to the LLM's as when it was trained (unless not `strict`)."""
        pieces = bridge_pieces(whisper_tokenizer, self.processor.tokenizer, self.config.decoder_ids["eot"])
        found, expected = pieces_fingerprint(pieces), self.config.bridge_fingerprint
        if strict and expected and found != expected:
            raise CheckpointError(f"the token bridge was built from other tokenizers (fingerprint {expected}, now "
                                  f"{found}): load with the tokenizers it was trained with, or pass strict=False")
        self.config.bridge_fingerprint = found
        embeddings = self.language_model.get_input_embeddings().weight
        self.token_bridge = TokenBridge(bridge_table(pieces, embeddings)).to(embeddings.device)

    def enable_lora(self, settings: LoraSettings) -> None:
        """LoRA on the LLM (blsp.lora): trainable beside the adapter, saved in its checkpoint."""
        if self.lora_gate is not None:
            raise BlspError("this model already has LoRA on its LLM")
        self.config.lora = settings.to_dict()
        self.lora_gate = add_lora(self.language_model, settings)
        self.freeze_backbones()

    def lora_off(self) -> contextlib.AbstractContextManager:
        """The frozen LLM itself for the duration (the KD teacher, text-only baselines)."""
        return self.lora_gate.disabled() if self.lora_gate is not None else contextlib.nullcontext()

    def reading(self, input_ids: torch.Tensor) -> contextlib.AbstractContextManager:
        """For the LLM calls inside: which positions of `input_ids` are speech (speech-only LoRA)."""
        if self.lora_gate is None:
            return contextlib.nullcontext()
        return self.lora_gate.positions(input_ids == SPEECH_TOKEN_ID)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: the adapter, and the CTC head and the LLM's LoRA weights
        (prefixed) when there are any."""
        state = dict(self.adapter.state_dict())
        if self.ctc_head is not None:
            state.update({f"{CTC_HEAD_PREFIX}{k}": v for k, v in self.ctc_head.state_dict().items()})
        if self.lora_gate is not None:
            state.update({f"{LORA_PREFIX}{k}": v for k, v in lora_state_dict(self.language_model).items()})
        state.update({f"{ENCODER_PREFIX}{k}": v for k, v in self.trained_encoder_state().items()})
        return state

    def trained_encoder_state(self) -> dict[str, torch.Tensor]:
        first = self.config.first_trainable_encoder_layer
        if first is None:
            return {}
        return {k: v for k, v in self.audio_tower.state_dict().items()
                if k.startswith("layer_norm.") or (k.startswith("layers.") and int(k.split(".")[1]) >= first)}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor], source: Path) -> None:
        head = {k[len(CTC_HEAD_PREFIX):]: v for k, v in state.items() if k.startswith(CTC_HEAD_PREFIX)}
        lora = {k[len(LORA_PREFIX):]: v for k, v in state.items() if k.startswith(LORA_PREFIX)}
        encoder = {k[len(ENCODER_PREFIX):]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
        adapter = {k: v for k, v in state.items() if not k.startswith((CTC_HEAD_PREFIX, LORA_PREFIX, ENCODER_PREFIX))}
        problems = []
        expected = self.trained_encoder_state()
        if set(encoder) != set(expected):
            problems.append(f"trained encoder layers: {sorted(set(encoder) ^ set(expected))[:4]} do not match "
                            f"config.json (encoder_trainable_layers {self.config.encoder_trainable_layers})")
        elif encoder:
            self.audio_tower.load_state_dict(encoder, strict=False)
        if self.lora_gate is None and lora:
            problems.append("LoRA weights but no LoRA in config.json")
        elif self.lora_gate is not None:
            missing = load_lora_state_dict(self.language_model, lora)
            if missing:
                problems.append(f"LoRA: missing {missing[:4]}{' ...' if len(missing) > 4 else ''}")
        for name, module, part in (("adapter", self.adapter, adapter), ("CTC head", self.ctc_head, head)):
            if module is None:
                if part:
                    problems.append(f"{name} weights but no {name} in config.json")
                continue
            missing, unexpected = module.load_state_dict(part, strict=False)
            if missing or unexpected:
                problems.append(f"{name}: missing {missing}, unexpected {unexpected}")
        if problems:
            raise CheckpointError(f"{source}: weights do not fit the model ({'; '.join(problems)})")

    def trainable_parameters(self) -> list[nn.Parameter]:
        head = list(self.ctc_head.parameters()) if self.ctc_head is not None else []
        return (list(self.adapter.parameters()) + head + lora_parameters(self.language_model)
                + self.trainable_encoder_parameters())

    @classmethod
    def from_components(
        cls,
        encoder: str = "whisper-base",
        llm: str = "smollm2-135m-instruct",
        adapter_type: str = "conv",
        adapter_bottleneck: int = 512,
        adapter_downsample: int = 8,
        system_prompt: str | None = None,
        torch_dtype: torch.dtype = torch.float32,
        seed: int = 0,
        speech_states: str = "encoder",
        speech_vectors: str = "adapter",
        speech_language: str = "en",
    ) -> "BlspModel":
        """A new model with a fresh adapter between a pretrained encoder and LLM (names or dirs);
        `speech_states` "decoder": the adapter reads Whisper's decoder states (SPEECH_STATES) as it
        transcribes `speech_language` ("auto": the language it hears), and with `speech_vectors`
        "tokens" corrects the token bridge's vectors (blsp.bridge)."""
        if speech_vectors == "tokens" and speech_states != "decoder":
            raise BlspError("speech vectors 'tokens' of a new model: with speech states 'decoder' (with CTC "
                            "compression they come with the CTC head: enable_ctc_compression)")
        check_speech_states(speech_states)  # before minutes go into loading
        decoding = speech_states == "decoder"
        whisper = load_whisper(encoder, torch_dtype, with_decoder=decoding, language=speech_language)
        audio_tower, encoder_config = whisper.encoder, whisper.config
        language_model, tokenizer = load_language_model(llm, torch_dtype)
        config = BlspConfig(
            encoder_config=encoder_config,
            llm_config=language_model.config,
            adapter_type=adapter_type,
            adapter_bottleneck=adapter_bottleneck,
            adapter_downsample=adapter_downsample,
            encoder_name=encoder,
            llm_name=llm,
            encoder_fingerprint=weights_fingerprint(audio_tower),
            llm_fingerprint=weights_fingerprint(language_model),
            system_prompt=system_prompt,
            speech_states=speech_states,
            speech_vectors=speech_vectors,
            decoder_ids=whisper.decoding_ids,
            speech_language=speech_language if decoding else None,
            decoder_fingerprint=weights_fingerprint(whisper.decoder) if whisper.decoder is not None else None,
        )
        model = cls(config, audio_tower=audio_tower, language_model=language_model, speech_decoder=whisper.decoder)
        model.init_adapter(seed)
        model.attach_processor(tokenizer)
        if model.reads_token_bridge:
            model.build_token_bridge(whisper.tokenizer)
        return model

    def attach_processor(self, tokenizer: Any) -> None:
        from .processing import BlspProcessor

        self.processor = BlspProcessor(
            tokenizer,
            n_mels=self.config.encoder_config.num_mel_bins,
            system_prompt=self.config.system_prompt,
            # plain int arithmetic (output_lengths takes ints as well as tensors): batching calls it
            # once per clip, and a tensor op per call was a good part of a GPU step's CPU time
            speech_lengths=lambda n: int(self.adapter.output_lengths(int(n))),
        )

    def save_pretrained(self, save_directory: str | Path, **_: Any) -> None:  # type: ignore[override]
        """Write config.json and the adapter's weights only (the backbones are named, not copied)."""
        from safetensors.torch import save_file

        from .io import replace_dir

        final = Path(save_directory)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.tmp")
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        self.config.save_pretrained(tmp)
        state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in self.trainable_state_dict().items()}
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        written = {f.name for f in tmp.iterdir()}
        if final.exists() and any(f.name not in written for f in final.iterdir()):
            # A directory holding other things (a training run's checkpoints and logs, even when an
            # earlier save put weights there): replace only our files, each in one atomic rename.
            for f in tmp.iterdir():
                f.replace(final / f.name)
            tmp.rmdir()
        else:
            replace_dir(tmp, final)

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        path: str | Path,
        encoder: str | None = None,
        llm: str | None = None,
        torch_dtype: torch.dtype = torch.float32,
        strict: bool = True,
        **_: Any,
    ) -> "BlspModel":
        """Load a saved adapter onto the encoder and LLM it names (or the ones given).

        With `strict`, a backbone whose weights differ from the ones the adapter was trained
        against is refused: an adapter is meaningless on another LLM.
        """
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / ADAPTER_WEIGHTS).exists():
            raise CheckpointError(f"{path}: not a blsp checkpoint (no {ADAPTER_WEIGHTS})")
        config = BlspConfig.from_pretrained(path)
        encoder = encoder or config.encoder_name
        llm = llm or config.llm_name
        # the decoding ids come from config.json: the tokenizer need not be there
        whisper = load_whisper(encoder, torch_dtype, with_decoder=config.speech_states == "decoder",
                               tokenizer=config.reads_token_bridge)
        language_model, tokenizer = load_language_model(llm, torch_dtype)
        for what, name, module, expected in (
            ("encoder", config.encoder_name, whisper.encoder, config.encoder_fingerprint),
            ("speech decoder", config.encoder_name, whisper.decoder, config.decoder_fingerprint),
            ("LLM", config.llm_name, language_model, config.llm_fingerprint),
        ):
            if module is None:
                continue
            found = weights_fingerprint(module)
            if strict and expected and found != expected:
                raise CheckpointError(
                    f"{path}: this adapter was trained against the {what} {name!r} "
                    f"(fingerprint {expected}), but the {what} loaded has fingerprint {found}. "
                    "Load it with the same model, or pass strict=False (--no-strict) to force."
                )
        model = cls(config, audio_tower=whisper.encoder, language_model=language_model, speech_decoder=whisper.decoder)
        model.load_trainable_state_dict(load_file(str(path / ADAPTER_WEIGHTS)), path / ADAPTER_WEIGHTS)
        model.attach_processor(tokenizer)
        if model.reads_token_bridge:
            model.build_token_bridge(whisper.tokenizer, strict)
        return model

    # -- forward -------------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:  # type: ignore[override]
        return self.language_model.dtype

    @torch.no_grad()
    def encode_mel(self, mel: torch.Tensor, mel_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Frozen encoder features ([B, T, d_enc], lengths) of padded log-mel [B, n_mels, T]; with
        speech states "decoder", Whisper's decoder states along its transcript ([B, S, d], lengths)."""
        mel = mel.to(self.audio_tower.conv1.weight.device, self.audio_tower.conv1.weight.dtype)
        if self.speech_decoder is not None:
            return self.decoder_states(mel, mel_lengths.to(mel.device))
        # With trained top layers, what is cached is the frozen part's output (speech_embeddings runs the rest).
        stop = self.config.first_trainable_encoder_layer
        return run_whisper_encoder(self.audio_tower, mel, mel_lengths.to(mel.device), stop)

    @torch.no_grad()
    def decoder_states(self, mel: torch.Tensor, mel_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Whisper's greedy transcript of each clip, as its decoder's final hidden states: the state
        that chose each of its tokens (a clip heard as silence: the one state that chose to end).
        ([B, S, d], lengths)."""
        from .whisper import greedy_decode

        weight = self.speech_decoder.embed_tokens.weight  # Whisper's output projection is tied to it
        lengths = [int(n) for n in mel_lengths.tolist()]
        widths = [decoder_window(n) for n in lengths]
        # Clips of one window width go together (the decoder attends to the whole window, so a
        # clip's states must not depend on what it was batched with).
        parts: dict[int, torch.Tensor] = {}
        steps = torch.zeros(len(lengths), dtype=torch.long, device=mel.device)
        for width in sorted(set(widths)):
            rows = [i for i, w in enumerate(widths) if w == width]
            index = torch.tensor(rows, device=mel.device)
            windows = with_silence(mel[index], mel_lengths[index], width)
            encoded, _ = run_whisper_encoder(self.audio_tower, windows, torch.full_like(index, width))
            limits = torch.tensor([decoder_token_limit(lengths[i]) for i in rows], device=mel.device)
            tokens, states, _ = greedy_decode(self.speech_decoder, weight, encoded, self.config.decoder_ids, limits)
            # the states that chose the text's tokens; a clip heard as silence: the one that chose to end
            n = [max(len(t), 1) for t in tokens]
            parts.update({i: states[k, : n[k]] for k, i in enumerate(rows)})
            steps[index] = torch.tensor(n, device=mel.device)
        out = mel.new_zeros(len(lengths), int(steps.max()), weight.shape[1])
        for i, states in parts.items():
            out[i, : states.shape[0]] = states
        return out, steps

    def speech_embeddings(
        self, encoder_features: torch.Tensor, encoder_lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter's speech vectors [B, S, d_llm] and their lengths, before any compression."""
        param = next(self.adapter.parameters())
        x, lengths = encoder_features.to(param.device, param.dtype), encoder_lengths.to(param.device)
        first = self.config.first_trainable_encoder_layer
        if first is not None:  # features are the hidden state below the trained top layers
            x = run_whisper_top(self.audio_tower, x, lengths, first)
        vectors, lengths = self.adapter(x, lengths)
        if self.reads_token_bridge:
            if self.token_bridge is None:
                raise BlspError("this model reads Whisper's decoder through its token bridge: build it "
                                "(BlspModel.from_pretrained / from_components do)")
            vectors = vectors + self.token_bridge(x, self.speech_decoder.embed_tokens.weight).to(vectors.dtype)
        return vectors, lengths

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        encoder_features: torch.Tensor | None = None,
        encoder_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with the adapter's speech vectors scattered into the speech slots."""
        embeds, _, _ = self._splice(input_ids, encoder_features, encoder_lengths)
        return embeds

    def prepare_inputs(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        encoder_features: torch.Tensor | None = None,
        encoder_lengths: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs_embeds, attention_mask) for the LLM: speech spliced in, and with CTC
        compression the dropped speech frames masked out (they then take no position either)."""
        embeds, keep, _ = self._splice(input_ids, encoder_features, encoder_lengths)
        return embeds, _hide_dropped_speech(attention_mask, input_ids, keep)

    def _splice(self, input_ids, encoder_features, encoder_lengths):
        """(embeds, keep flags of the speech slots or None, (speech, lengths) or None)."""
        embed = self.language_model.get_input_embeddings()
        speech_mask = input_ids == SPEECH_TOKEN_ID
        embeds = embed(input_ids.masked_fill(speech_mask, 0))
        n_slots = int(speech_mask.sum())
        if encoder_features is None:
            if n_slots:
                raise ValueError("input_ids hold speech slots but no speech features were given")
            return embeds, None, None
        speech, lengths = self.speech_embeddings(encoder_features, encoder_lengths)
        vectors, keep = speech, None
        if self.ctc_head is not None:
            if self.config.speech_vectors == "tokens":
                logits = self.ctc_head(speech)
                log_probs = F.log_softmax(logits.detach().float(), dim=-1)
                vectors = self.ctc_head.token_mix(logits)
            else:
                with torch.no_grad():
                    log_probs = self.ctc_head.log_probs(speech)
            vectors, keep = ctc_compress(vectors, lengths, log_probs)
        valid = torch.arange(speech.shape[1], device=speech.device)[None, :] < lengths[:, None]
        flat = vectors[valid]
        if flat.shape[0] != n_slots:
            raise ValueError(f"{n_slots} speech slots in input_ids but the adapter made {flat.shape[0]} vectors")
        embeds = embeds.masked_scatter(speech_mask[..., None], flat.to(embeds.dtype))
        return embeds, (keep[valid] if keep is not None else None), (speech, lengths)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        encoder_features: torch.Tensor | None = None,
        encoder_lengths: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_logits: bool = False,
        return_target_logits: bool = False,
        shared_prefix: Sequence[int] = (),
        **_: Any,
    ) -> BlspOutput:
        if return_logits and shared_prefix:
            raise ValueError("return_logits needs every position's hidden state; do not pass shared_prefix")
        embeds, keep, speech = self._splice(input_ids, encoder_features, encoder_lengths)
        attention_mask = _hide_dropped_speech(attention_mask, input_ids, keep)
        with self.reading(input_ids):
            hidden = self.llm_hidden_states(embeds, attention_mask, shared_prefix)
        out = BlspOutput(speech=speech)
        if return_logits:
            out.logits = self.lm_logits(hidden)
        if labels is not None:
            logits, targets = self.target_logits(hidden, labels)
            out.loss_sum = F.cross_entropy(logits.float(), targets, reduction="sum")
            out.n_tokens = torch.tensor(targets.numel(), device=hidden.device)
            out.loss = out.loss_sum / out.n_tokens.clamp(min=1)
            if return_target_logits:
                out.target_logits = logits
        return out

    def llm_hidden_states(self, embeds: torch.Tensor, attention_mask: torch.Tensor,
                          shared_prefix: Sequence[int] = ()) -> torch.Tensor:
        """The LLM's last hidden states; positions come from the mask so padding takes none.

        `shared_prefix`: token ids that open every row (right padding: the system prompt and the
        instruction before the speech). Their keys and values are computed once and reused, as
        they cannot depend on the speech; the hidden states returned at those positions are
        zeros (no target is ever scored there). With LoRA acting on text the prefix's keys and
        values change as it trains, so they are computed every time; with the LLM sharded
        (`--fsdp`) every forward all-gathers on all ranks together, and the prefix cache would run
        one extra forward on whichever rank misses it, so it is off there too.
        """
        if (self.lora_gate is not None and self.lora_gate.acts_on_text) or is_sharded(self):
            shared_prefix = ()
        with attention_kernels():
            return self._llm_hidden_states(embeds, attention_mask, shared_prefix)

    def _llm_hidden_states(self, embeds: torch.Tensor, attention_mask: torch.Tensor,
                           shared_prefix: Sequence[int]) -> torch.Tensor:
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        base = self.language_model.get_decoder()
        n = len(shared_prefix)
        if not n:
            # use_cache=False: no KV cache to build (nothing reads it after a training forward).
            return base(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=False).last_hidden_state
        cache = self._prefix_cache(tuple(shared_prefix), embeds.shape[0], embeds.dtype)
        if any("forward" in vars(layer) for layer in base.layers) and not all(
                isinstance(layer, _ReadOnlyKV) for layer in cache.layers):
            # Checkpointed layers would append to a writable cache twice: go without the prefix.
            return self.llm_hidden_states(embeds, attention_mask)
        rest = base(inputs_embeds=embeds[:, n:], attention_mask=attention_mask, position_ids=position_ids[:, n:],
                    past_key_values=cache, use_cache=True).last_hidden_state
        return torch.cat([rest.new_zeros(rest.shape[0], n, rest.shape[2]), rest], dim=1)

    def set_llm_checkpointing(self, enabled: bool) -> None:
        """Recompute each frozen LLM layer in the backward pass instead of keeping its activations.

        Not transformers' `gradient_checkpointing_enable`: that one acts only in train mode (the
        frozen LLM stays in eval mode, so dropout stays off) and drops a passed KV cache, which
        would silently cut the shared prefix off. Here each decoder layer's forward is wrapped in
        a non-reentrant `torch.utils.checkpoint`, whatever the mode; the prefix cache is
        read-only (`_ReadOnlyKV`), so the recomputation sees exactly what the forward saw.
        """
        for layer in self.language_model.get_decoder().layers:
            if enabled and "forward" not in vars(layer):
                layer.forward = _checkpointed(layer.forward, self)
            elif not enabled and "forward" in vars(layer):
                del layer.forward

    def _prefix_cache(self, prefix: tuple[int, ...], batch: int, dtype: torch.dtype):
        """A fresh KV cache holding `prefix` for `batch` rows (the per-layer tensors are kept
        once: the LLM is frozen, so a prefix's keys and values never change)."""
        from transformers import DynamicCache

        device = self.language_model.device
        key = (prefix, dtype, device, torch.is_autocast_enabled(device.type))
        if key in self._prefix_kv:
            self._prefix_kv.move_to_end(key)
        else:
            # A few prefixes in turn are common: the alignment report's three prompts batch after
            # batch, training batches with and without transcription rows. Recomputing on each
            # switch cost the demo's evaluation 14 s of its 93; ~2 MB a prefix for SmolLM2, so keep four.
            while len(self._prefix_kv) >= PREFIX_CACHE_SIZE:
                self._prefix_kv.popitem(last=False)
            ids = torch.tensor([prefix], device=device)
            with torch.no_grad(), self.lora_off():  # the frozen LLM's (no speech in a prefix)
                out = self.language_model.get_decoder()(
                    inputs_embeds=self.language_model.get_input_embeddings()(ids).to(dtype), use_cache=True)
            self._prefix_kv[key] = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
        cache = DynamicCache(ddp_cache_data=[(k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1))
                                             for k, v in self._prefix_kv[key]], config=self.language_model.config)
        for layer in cache.layers:
            if DynamicLayer is not None and type(layer) is DynamicLayer:
                layer.__class__ = _ReadOnlyKV
        return cache

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.language_model.get_output_embeddings()(hidden)
        cap = getattr(self.language_model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits

    def target_logits(self, hidden: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits only where a next token is scored ([N, V]) and those tokens ([N]).

        Projecting only the target positions onto the vocabulary saves most of the memory and
        time of the LM head (the continuation is a fraction of the sequence).
        """
        shift_labels = labels[:, 1:]
        where = shift_labels != IGNORE_INDEX
        return self.lm_logits(hidden[:, :-1][where]), shift_labels[where]

    # -- inference -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(  # type: ignore[override]
        self,
        audio: Any = None,
        instruction: str | None = None,
        messages: Sequence[Sequence[dict]] | None = None,
        max_new_tokens: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_p: float = 1.0,
        **generate_kwargs: Any,
    ) -> list[str]:
        """Follow an instruction on speech.

        `audio`: a path, a 16 kHz waveform, or a list of them (batched). Or `messages`: a list
        of conversations whose content parts may be `{"type": "audio", "audio": path|array}`.
        """
        from .inference import generate_batch

        return generate_batch(
            self, audio=audio, instruction=instruction, messages=messages, max_new_tokens=max_new_tokens,
            do_sample=do_sample, temperature=temperature, top_p=top_p, **generate_kwargs,
        )


# ----------------------------------------------------------------------------------------------
# Loading the backbones
# ----------------------------------------------------------------------------------------------
@dataclass
class WhisperParts:
    encoder: WhisperEncoder
    config: PretrainedConfig
    decoder: WhisperDecoder | None = None  # with its decoding ids and tokenizer, for speech states "decoder"
    decoding_ids: dict | None = None
    tokenizer: Any = None


def load_whisper(name: str, torch_dtype: torch.dtype = torch.float32, with_decoder: bool = False,
                 tokenizer: bool = True, language: str = "en") -> WhisperParts:
    """The frozen parts of a Whisper checkpoint (packaged name, local dir or hub id): its encoder,
    and `with_decoder` its decoder too, with the ids that prompt it (from its tokenizer, when
    `tokenizer`) to transcribe `language`."""
    from transformers import WhisperForConditionalGeneration

    from .packaged import resolve

    path = resolve(name)
    try:
        whisper = WhisperForConditionalGeneration.from_pretrained(path, dtype=torch_dtype)
    except OSError as err:
        raise BlspError(f"cannot load the speech encoder {name!r}: {err}") from None
    whisper.requires_grad_(False).eval()
    parts = WhisperParts(whisper.get_encoder(), whisper.config)
    if with_decoder:
        parts.decoder = whisper.get_decoder()
        if tokenizer:
            from .convert import special_token_id
            from .whisper import decoding_ids

            try:
                parts.tokenizer = AutoTokenizer.from_pretrained(path)
                special_token_id(parts.tokenizer, "<|startoftranscript|>")  # a Whisper tokenizer at all
            except (OSError, ValueError, KeyError, BlspError) as err:
                raise SpeechStatesError(f"speech states 'decoder' need Whisper's tokenizer beside {name!r} ({path}): "
                                f"{err}") from None
            parts.decoding_ids = decoding_ids(whisper, parts.tokenizer, language)
    return parts


def load_audio_tower(name: str, torch_dtype: torch.dtype = torch.float32) -> tuple[WhisperEncoder, PretrainedConfig]:
    """The encoder half of a Whisper checkpoint (packaged name, local dir or hub id)."""
    parts = load_whisper(name, torch_dtype)
    return parts.encoder, parts.config


def load_language_model(name: str, torch_dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, Any]:
    """A causal LM and its tokenizer, with an explicit pad id (Llama-2's tokenizer has none)."""
    from .packaged import resolve

    path = resolve(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    except OSError as err:
        raise BlspError(f"cannot load the LLM {name!r}: {err}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.requires_grad_(False)
    return model.eval(), tokenizer


def describe(model: BlspModel) -> dict:
    """Parameter counts of each part, for logs and the README."""
    count = lambda m, trainable=False: sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable)
    return {
        "audio_tower": count(model.audio_tower),
        "speech_decoder": count(model.speech_decoder) if model.speech_decoder is not None else 0,
        "adapter": count(model.adapter),
        "language_model": count(model.language_model),
        "trainable": count(model, trainable=True),
    }


def dump_config(model: BlspModel) -> str:
    return json.dumps(model.config.to_dict(), indent=2)
