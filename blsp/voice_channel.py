"""The voice channel: how the voice sounds, read by the LLM beside the words.

The token bridge gives the LLM Whisper's words and nothing else: who speaks, how fast, whispered
or not, in what noise, never reach it (a cascade with soft tokens, which the BLSP paper argues
against). Whisper's encoder carries the speaker in its middle layers, so per clip the statistics
over time of the hidden states after `config.voice_layers` (mean, standard deviation, mean change
between adjacent frames), and a row of scalars (log duration; tokens a second where the source
knows its tokens), are computed with the clip's features and cached as their first
`voice_rows(config)` rows (`prepend_voice_rows`). A small MLP (`VoiceChannel`) turns them into
`config.voice_vectors` vectors in the LLM's embedding space, which the LLM reads just before the
words' vectors (blsp.modeling). `voice_vectors` 0: no channel, the paper's path.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import BlspError

STATISTICS = ("mean", "std", "delta")  # rows per tapped layer
N_SCALARS = 2  # log seconds, tokens a second (0 where unknown): the scalar row's first entries
SCALAR_ROWS = 1
TOKENS_PER_SECOND_SCALE = 4.0  # English runs at ~4 Whisper tokens a second: the scalar sits near 1
VOICE_HIDDEN = 1024  # the MLP's hidden width


def default_voice_layers(encoder_layers: int) -> tuple[int, ...]:
    """Layers a third and two thirds of the way up (1-based): speaker identity peaks in the middle
    of speech encoders (SUPERB's layer-wise results; DeSTA2.5 reads several Whisper layers)."""
    return tuple(sorted({max(1, encoder_layers // 3), max(1, (2 * encoder_layers) // 3)}))


def voice_rows(config) -> int:
    """Rows the voice statistics take at the head of each clip's cached features (0: no channel)."""
    if not getattr(config, "voice_vectors", 0):
        return 0
    return len(config.voice_layers) * len(STATISTICS) + SCALAR_ROWS


def check_voice_settings(voice_vectors: int, voice_layers, encoder_layers: int | None,
                         first_trainable_layer: int | None = None) -> None:
    if voice_vectors < 0:
        raise BlspError(f"voice vectors {voice_vectors}: 0 (no voice channel) or more")
    if not voice_vectors:
        return
    if not voice_layers:
        raise BlspError("a voice channel needs the encoder layers it reads (voice_layers)")
    if encoder_layers is not None and not all(1 <= k <= encoder_layers for k in voice_layers):
        raise BlspError(f"voice layers {list(voice_layers)}: the encoder has layers 1-{encoder_layers}")
    if first_trainable_layer is not None and max(voice_layers) > first_trainable_layer:
        raise BlspError(f"voice layers {list(voice_layers)}: above the encoder's first trained layer "
                        f"({first_trainable_layer + 1}); their cached statistics would go stale as it trains")


@torch.no_grad()
def voice_statistics(hidden: list[torch.Tensor], frames: torch.Tensor, seconds: torch.Tensor,
                     tokens: torch.Tensor | None) -> torch.Tensor:
    """[B, rows, d]: per tapped hidden state [B, T, d] its mean, standard deviation and mean
    absolute change between adjacent frames over each clip's first `frames` frames; then the
    scalar row (log seconds, tokens a second / TOKENS_PER_SECOND_SCALE, zeros after)."""
    rows = []
    for h in hidden:
        h = h.float()
        keep = (torch.arange(h.shape[1], device=h.device)[None, :] < frames[:, None]).float()[..., None]
        n = keep.sum(1).clamp(min=1)
        mean = (h * keep).sum(1) / n
        std = (((h - mean[:, None]) ** 2 * keep).sum(1) / n).sqrt()
        pairs = keep[:, 1:] * keep[:, :-1]
        delta = ((h[:, 1:] - h[:, :-1]).abs() * pairs).sum(1) / pairs.sum(1).clamp(min=1)
        rows += [mean, std, delta]
    scalars = torch.zeros_like(rows[0])
    seconds = seconds.float().clamp(min=1e-2)
    scalars[:, 0] = seconds.log()
    if tokens is not None:
        scalars[:, 1] = tokens.float() / seconds / TOKENS_PER_SECOND_SCALE
    return torch.stack(rows + [scalars], dim=1)


def prepend_voice_rows(rows: torch.Tensor, features: torch.Tensor, lengths: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The voice rows [B, R, d] at the head of padded features [B, S, d]: padding stays at the end."""
    return torch.cat([rows.to(features.dtype), features], dim=1), lengths + rows.shape[1]


def split_voice_rows(features: torch.Tensor, lengths: torch.Tensor, n_rows: int
                     ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(voice rows or None, the words' features, their lengths) of cached features."""
    if not n_rows:
        return None, features, lengths
    if int(lengths.min()) < n_rows:
        raise BlspError(f"speech features of {int(lengths.min())} rows: a voice channel's features open with "
                        f"{n_rows} rows of voice statistics (features cached without the channel?)")
    return features[:, :n_rows], features[:, n_rows:], lengths - n_rows


class VoiceChannel(nn.Module):
    """Voice statistics [B, R, d_in] -> `n_vectors` LLM embeddings [B, n_vectors, d_llm].

    The statistics rows are log-compressed where they are scales (std, change), normalised together
    (one LayerNorm over all of them, so their relative sizes, loudness among them, survive), joined by
    the scalars, and sent through a two-layer MLP; a LayerNorm closes it, its gain starting at the
    scale of the LLM's token embeddings (blsp.adapters.init_adapter says why).
    """

    def __init__(self, d_in: int, n_layers: int, d_llm: int, n_vectors: int, hidden: int = VOICE_HIDDEN):
        super().__init__()
        self.n_layers, self.n_vectors, self.d_llm = n_layers, n_vectors, d_llm
        width = n_layers * len(STATISTICS) * d_in
        self.stats_norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width + N_SCALARS, hidden)
        self.fc2 = nn.Linear(hidden, n_vectors * d_llm)
        self.norm = nn.LayerNorm(d_llm)

    @property
    def n_rows(self) -> int:
        return self.n_layers * len(STATISTICS) + SCALAR_ROWS

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        stats, scalars = rows[:, :-SCALAR_ROWS].float(), rows[:, -SCALAR_ROWS, :N_SCALARS].float()
        kinds = torch.arange(stats.shape[1], device=stats.device) % len(STATISTICS)
        scales = (kinds != STATISTICS.index("mean"))[None, :, None]
        stats = torch.where(scales, stats.clamp(min=1e-4).log(), stats)
        x = torch.cat([self.stats_norm(stats.flatten(1)), scalars], dim=-1).to(self.fc1.weight.dtype)
        x = self.fc2(nn.functional.gelu(self.fc1(x)))
        return self.norm(x.view(x.shape[0], self.n_vectors, self.d_llm))


@torch.no_grad()
def init_voice_channel(channel: VoiceChannel, seed: int, output_scale: float) -> None:
    """Seeded uniform init (as the adapter's), the closing gain at `output_scale`, the std of the
    LLM's token embeddings. At 0 (the channel starting at nothing) the gain grew to 0.009 in the
    voice demo's 144 steps, 1/15 of the embeddings' scale: the LLM heard no voice (2026-12-06)."""
    gen = torch.Generator().manual_seed(seed + 1)
    for name, p in channel.named_parameters():
        if name.startswith(("norm.", "stats_norm.")):
            continue
        if p.dim() > 1:
            p.copy_(torch.empty_like(p, device="cpu").uniform_(-1, 1, generator=gen) / math.sqrt(p.shape[1]))
        else:
            p.zero_()
    channel.norm.weight.fill_(output_scale)
    channel.norm.bias.zero_()
