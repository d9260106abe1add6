"""The voice channel: how the voice sounds, read by the LLM beside the words.

The token bridge gives the LLM Whisper's words and nothing else: who speaks, how fast, whispered
or not, in what noise, never reach it (a cascade with soft tokens, which the BLSP paper argues
against). Whisper's encoder carries the speaker in its middle layers, so per clip the statistics
over time of the hidden states after `config.voice_layers` (mean, standard deviation, mean change
between adjacent frames), and a row of scalars (log duration; tokens a second where the source
knows its tokens), are computed with the clip's features and cached as their first
`voice_rows(config)` rows (`prepend_voice_rows`). `VoiceChannel` turns them into vectors in the
LLM's embedding space, which the LLM reads just before the words' vectors (blsp.modeling): one per
`config.voice_attributes` (a classifier fitted on the corpus's labels names the class it hears
with the LLM's own word: `fit_voice_heads`), then `config.voice_vectors` free ones (a small MLP).
Neither: no channel, the paper's path.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .errors import BlspError
from .voice import VOICE_ATTRIBUTES
from .voice_gate import VoiceGate

STATISTICS = ("mean", "std", "delta")  # rows per tapped layer
N_SCALARS = 2  # log seconds, tokens a second (0 where unknown): the scalar row's first entries
SCALAR_ROWS = 1
TOKENS_PER_SECOND_SCALE = 4.0  # English runs at ~4 Whisper tokens a second: the scalar sits near 1
VOICE_HIDDEN = 1024  # the MLP's hidden width


def default_voice_layers(encoder_layers: int) -> tuple[int, ...]:
    """Layers a third and two thirds of the way up (1-based): speaker identity peaks in the middle
    of speech encoders (SUPERB's layer-wise results; DeSTA2.5 reads several Whisper layers)."""
    return tuple(sorted({max(1, encoder_layers // 3), max(1, (2 * encoder_layers) // 3)}))


def has_voice_channel(config) -> bool:
    """Whether the model hears the voice: free vectors, or attributes it names (or both)."""
    return bool(getattr(config, "voice_vectors", 0) or getattr(config, "voice_attributes", None))


def voice_slots(config) -> int:
    """Vectors the LLM reads from the voice channel: one per named attribute, then the free ones."""
    return len(getattr(config, "voice_attributes", None) or ()) + getattr(config, "voice_vectors", 0)


VOICE_PLACES = ("before", "after")


def check_voice_place(place: str) -> None:
    if place not in VOICE_PLACES:
        raise BlspError(f"voice place {place!r}: choose from {', '.join(VOICE_PLACES)} (the words)")


def voice_place(config) -> str:
    """Where each clip's voice vectors sit: "before" its words (models saved before the choice) or "after"."""
    return getattr(config, "voice_place", None) or "before"


def voice_gated(config) -> bool:
    """Whether the voice vectors are read only where the request asks about the voice (blsp.voice_gate);
    False for models saved before the gate: they read them always."""
    return bool(getattr(config, "voice_gate", False))


def voice_rows(config) -> int:
    """Rows the voice statistics take at the head of each clip's cached features (0: no channel)."""
    if not has_voice_channel(config):
        return 0
    return len(config.voice_layers) * len(STATISTICS) + SCALAR_ROWS


def check_voice_attributes(names, what: str = "voice attributes") -> None:
    """Names of blsp.voice's attributes, each at most once (`what`: how the error names them)."""
    unknown = [a for a in names if a not in VOICE_ATTRIBUTES]
    if unknown:
        raise BlspError(f"{what} {', '.join(names)}: unknown {', '.join(unknown)} (known: {', '.join(VOICE_ATTRIBUTES)})")
    if len(set(names)) != len(names):
        raise BlspError(f"{what} {', '.join(names)}: each at most once")


def check_voice_settings(voice_vectors: int, voice_layers, encoder_layers: int | None,
                         first_trainable_layer: int | None = None, voice_attributes=()) -> None:
    if voice_vectors < 0:
        raise BlspError(f"voice vectors {voice_vectors}: 0 (no voice channel) or more")
    check_voice_attributes(voice_attributes or ())
    if not voice_vectors and not voice_attributes:
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
    """Voice statistics [B, R, d_in] -> LLM embeddings [B, len(attributes) + n_vectors, d_llm].

    Two kinds of vector, either or both:
    - one per named attribute (`attributes`, of blsp.voice.VOICE_ATTRIBUTES): a linear classifier
      over the standardised statistics (a head, fitted on the corpus's labels before step 2 by
      `fit_voice_heads`, then frozen) gives the class posterior, which mixes the attribute's class
      vectors; those start at the LLM's embeddings of the class words ("female", "fast") and train.
      The LLM so reads, from the first step, a word it knows for what the channel heard: a 144-step
      demo of free vectors alone taught it nothing of the voice (2026-12-06), though a linear probe
      on the same statistics names rate, whisper and noise of unseen voices in 98-100% of clips.
    - `n_vectors` free ones, for what no attribute names: the statistics are log-compressed where
      they are scales (std, change), normalised together (one LayerNorm over all of them, so their
      relative sizes, loudness among them, survive), joined by the scalars and sent through a
      two-layer MLP; a LayerNorm closes it, its gain starting at the scale of the LLM's token
      embeddings (blsp.adapters.init_adapter says why).
    """

    def __init__(self, d_in: int, n_layers: int, d_llm: int, n_vectors: int, attributes: tuple[str, ...] = (),
                 hidden: int = VOICE_HIDDEN, gate: bool = False):
        super().__init__()
        # whether the LLM reads the vectors at all, decided per request (blsp.voice_gate); None: always
        self.gate = VoiceGate(d_llm) if gate else None
        self.n_layers, self.n_vectors, self.d_llm = n_layers, n_vectors, d_llm
        self.attributes = tuple(attributes)
        width = n_layers * len(STATISTICS) * d_in
        if n_vectors:
            self.stats_norm = nn.LayerNorm(width)
            self.fc1 = nn.Linear(width + N_SCALARS, hidden)
            self.fc2 = nn.Linear(hidden, n_vectors * d_llm)
            self.norm = nn.LayerNorm(d_llm)
        if self.attributes:
            # the heads' input standardisation, fitted with them (fit_voice_heads)
            self.register_buffer("feature_mean", torch.zeros(width + N_SCALARS))
            self.register_buffer("feature_std", torch.ones(width + N_SCALARS))
            self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))
            self.heads = nn.ModuleDict({a: nn.Linear(width + N_SCALARS, len(VOICE_ATTRIBUTES[a].labels))
                                        for a in self.attributes})
            self.heads.requires_grad_(False)  # fitted on the labels, not moved by the LM loss
            self.class_vectors = nn.ParameterDict({a: nn.Parameter(torch.zeros(len(VOICE_ATTRIBUTES[a].labels), d_llm))
                                                   for a in self.attributes})

    @property
    def n_rows(self) -> int:
        return self.n_layers * len(STATISTICS) + SCALAR_ROWS

    def inputs(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(statistics [B, width], scalars [B, N_SCALARS]) of the voice rows, scales log-compressed."""
        stats, scalars = rows[:, :-SCALAR_ROWS].float(), rows[:, -SCALAR_ROWS, :N_SCALARS].float()
        kinds = torch.arange(stats.shape[1], device=stats.device) % len(STATISTICS)
        scales = (kinds != STATISTICS.index("mean"))[None, :, None]
        return torch.where(scales, stats.clamp(min=1e-4).log(), stats).flatten(1), scalars

    def head_inputs(self, rows: torch.Tensor) -> torch.Tensor:
        """What the heads read: the statistics and scalars side by side, before standardisation."""
        return torch.cat(self.inputs(rows), dim=-1)

    def posteriors(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per named attribute its class posterior [B, classes] (classes as VOICE_ATTRIBUTES order them)."""
        z = (self.head_inputs(rows) - self.feature_mean) / self.feature_std
        return {a: self.heads[a](z.to(self.heads[a].weight.dtype)).float().softmax(-1) for a in self.attributes}

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        out = []
        if self.attributes:
            named = [p.to(self.class_vectors[a].dtype) @ self.class_vectors[a] for a, p in self.posteriors(rows).items()]
            out.append(torch.stack(named, dim=1))
        if self.n_vectors:
            stats, scalars = self.inputs(rows)
            x = torch.cat([self.stats_norm(stats), scalars], dim=-1).to(self.fc1.weight.dtype)
            x = self.fc2(nn.functional.gelu(self.fc1(x)))
            out.append(self.norm(x.view(x.shape[0], self.n_vectors, self.d_llm)))
        return torch.cat(out, dim=1) if len(out) > 1 else out[0]


@torch.no_grad()
def init_voice_channel(channel: VoiceChannel, seed: int, output_scale: float) -> None:
    """Seeded uniform init (as the adapter's), the closing gain at `output_scale`, the std of the
    LLM's token embeddings. At 0 (the channel starting at nothing) the gain grew to 0.009 in the
    voice demo's 144 steps, 1/15 of the embeddings' scale: the LLM heard no voice (2026-12-06)."""
    gen = torch.Generator().manual_seed(seed + 1)
    for name, p in channel.named_parameters():
        if name.startswith(("norm.", "stats_norm.", "heads.", "class_vectors.", "gate.")):
            continue  # norms at their defaults; heads and gate fitted on labels; class vectors: init_class_vectors
        if p.dim() > 1:
            p.copy_(torch.empty_like(p, device="cpu").uniform_(-1, 1, generator=gen) / math.sqrt(p.shape[1]))
        else:
            p.zero_()
    if channel.n_vectors:
        channel.norm.weight.fill_(output_scale)
        channel.norm.bias.zero_()


@torch.no_grad()
def init_class_vectors(channel: VoiceChannel, tokenizer, embeddings: torch.Tensor) -> None:
    """Each attribute's class vectors at the LLM's embedding of its class word (the mean of its
    tokens' where it takes several), as it reads the word inside a sentence (after a space)."""
    for a in channel.attributes:
        for k, word in enumerate(VOICE_ATTRIBUTES[a].words):
            ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
            channel.class_vectors[a][k] = embeddings[ids].float().mean(0).to(channel.class_vectors[a].dtype)


VOICE_HEAD_L2 = 1e-2  # weight decay of the heads' logistic regression (on standardised inputs)
VOICE_HEAD_STEPS = 100  # L-BFGS iterations: converged on 1,200 clips x 3,074 inputs in a few seconds


def fit_voice_heads(channel: VoiceChannel, rows: torch.Tensor, labels: dict[str, list[str | None]]) -> dict:
    """Fit the named attributes' heads by L2-regularised logistic regression on the voice rows of
    the training clips [N, R, d] and their labels (a class per clip, None where a clip's is not
    known); the inputs' standardisation with them. Returns per attribute the clips, the classes'
    counts and the training accuracy (the log of the fit). Every attribute needs two classes seen."""
    x = channel.head_inputs(rows).float()
    mean, std = x.mean(0), x.std(0).clamp(min=1e-3)
    channel.feature_mean.copy_(mean)
    channel.feature_std.copy_(std)
    z = (x - mean) / std
    log = {}
    for a in channel.attributes:
        classes = VOICE_ATTRIBUTES[a].labels
        known = [(i, classes.index(v)) for i, v in enumerate(labels.get(a, [])) if v is not None]
        counts = {c: sum(1 for _, k in known if classes[k] == c) for c in classes}
        if sum(1 for n in counts.values() if n) < 2:
            raise BlspError(f"voice attribute {a}: the training lines state {counts or 'none of it'}; its classifier "
                            "needs clips of at least two classes (a corpus built with voice_attributes: true)")
        idx = torch.tensor([i for i, _ in known])
        y = torch.tensor([k for _, k in known])
        head = channel.heads[a]
        weight = torch.zeros_like(head.weight, dtype=torch.float32, requires_grad=True)
        bias = torch.zeros_like(head.bias, dtype=torch.float32, requires_grad=True)
        opt = torch.optim.LBFGS([weight, bias], max_iter=VOICE_HEAD_STEPS, line_search_fn="strong_wolfe")

        def loss_fn():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(z[idx] @ weight.T + bias, y) + VOICE_HEAD_L2 / 2 * weight.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(loss_fn)
        head.weight.copy_(weight.detach())
        head.bias.copy_(bias.detach())
        accuracy = float(((z[idx] @ weight.T + bias).argmax(-1) == y).float().mean())
        log[a] = {"clips": len(known), "classes": counts, "train_accuracy": round(accuracy, 4)}
    channel.fitted.fill_(True)
    return log
