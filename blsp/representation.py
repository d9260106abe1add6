"""Representation analysis (the paper's appendix): does the LLM treat speech like its transcript?

For each utterance and instruction, the LLM reads the prompt once with the speech in the user
turn and once with the transcript there. At every layer we mean-pool the hidden states over the
speech span and over the transcript's span, and take the cosine of the two means:
  - same instruction: speech and its transcript under one instruction;
  - different instruction: speech under one instruction, its transcript under another (does the
    similarity survive a change of context, i.e. is it about the content?);
  - mismatched utterance (a control): speech and *another* sentence's transcript under the same
    instruction. The prompt around the slot is identical, so attention to it alone makes later
    layers similar; only the margin over this control says the content is shared.
Layer 0 is the input (the adapter's vectors against the transcript's token embeddings); layer l
is the output of decoder layer l (the last one after the final norm, as Hugging Face returns it).

Raw cosines of an LLM's hidden states are high for any two inputs (a few directions dominate
every state: on SmolLM2 the mismatched control is within 0.02 of the matched pair at most
layers), so each number is also given "centred": from every pooled speech state the per-layer
mean of all pooled speech states of the set is subtracted, and likewise for the transcripts.
That removes what every clip shares, and the offset between the two modalities, and leaves what
tells one utterance from another: a centred cosine near 1 says an utterance's speech stands out
from the other speech in the direction its transcript stands out from the other transcripts;
the mismatched control then sits near 0.

With a contrast adapter (the paper's ASR-only adapter), the same numbers for it on the same
utterances, swapped into the same model (the backbones must be the ones it was trained with).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .errors import CheckpointError
from .io import file_sha256
from .adapters import build_adapter
from .config import BlspConfig
from .modeling import ADAPTER_WEIGHTS, BlspModel
from .llm import token_embeddings
from .processing import SPEECH_TOKEN_ID
from .readers import build_reader
from .processing import Example
from .prompts import AudioSlot, pieces_to_ids

CONDITIONS = ("same_instruction", "different_instruction", "mismatched_utterance")


# ----------------------------------------------------------------------------------------------
# Hidden states of every layer, pooled over a span
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def layer_states(model: BlspModel, examples: Sequence[Example]) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Every layer's hidden states ([B, T, d] each, layer 0 = the inputs) of right-padded
    examples, and their input ids (the speech positions the LLM attends to marked SPEECH_TOKEN_ID)."""
    batch = model.processor.collate(examples)
    device = model.language_model.device
    batch = {k: v.to(device) for k, v in batch.items()}
    # the attention mask from prepare_inputs also hides the speech frames CTC compression drops
    embeds, mask = model.prepare_inputs(batch["input_ids"], batch["attention_mask"], batch.get("encoder_features"),
                                        batch.get("encoder_lengths"))
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)  # as BlspModel.llm_hidden_states
    out = model.language_model.get_decoder()(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids,
                                             output_hidden_states=True)
    return out.hidden_states, batch["input_ids"].masked_fill(mask == 0, model.processor.pad_id)


def pooled(states: Sequence[torch.Tensor], spans: torch.Tensor) -> torch.Tensor:
    """Mean over each example's span (a [B, T] bool mask), per layer: [B, layers, d] (float32).
    Layer outputs at masked positions are not used: speech ids of dropped frames are replaced
    by the pad id in what `layer_states` returns, so they are never in a span."""
    weights = spans.float() / spans.sum(1, keepdim=True).clamp(min=1)
    return torch.stack([torch.einsum("bt,btd->bd", weights, h.float()) for h in states], dim=1).cpu()


def transcript_span(model: BlspModel, instruction: str, transcript: str) -> tuple[list[int], int, int]:
    """The transcript prompt's ids and the [start, end) of the transcript in them.

    Each content part is tokenized on its own (prompts.py), so the transcript prompt is the speech
    prompt's tokens before the slot, the transcript's tokens, then the tokens after the slot;
    checked here rather than assumed.
    """
    proc = model.processor
    speech = proc.speech_prompt(instruction)
    slot = next(i for i, p in enumerate(speech) if isinstance(p, AudioSlot))
    before, after = pieces_to_ids(speech[:slot]), pieces_to_ids(speech[slot + 1 :])
    ids = pieces_to_ids(proc.transcript_prompt(instruction, transcript))
    end = len(ids) - len(after)
    if ids[: len(before)] != before or ids[end:] != after or end <= len(before):
        raise RuntimeError("the transcript prompt does not share the speech prompt's tokens around the slot")
    return ids, len(before), end


def _speech_means(model, instruction: str, feats: Sequence[torch.Tensor]) -> torch.Tensor:
    prompt = model.processor.speech_prompt(instruction)
    states, ids = layer_states(model, [Example(prompt, [f]) for f in feats])
    return pooled(states, ids == SPEECH_TOKEN_ID)


def _transcript_means(model, instruction: str, transcripts: Sequence[str]) -> torch.Tensor:
    spans = [transcript_span(model, instruction, t) for t in transcripts]
    states, ids = layer_states(model, [Example([i]) for i, _, _ in spans])
    mask = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    for row, (_, start, end) in enumerate(spans):
        mask[row, start:end] = True
    return pooled(states, mask)


# ----------------------------------------------------------------------------------------------
# The analysis
# ----------------------------------------------------------------------------------------------
def pooled_states(model: BlspModel, transcripts: Sequence[str], feats, utterances, instructions: Sequence[str],
                  batch_size: int = 8, progress: bool = True,
                  desc: str = "representation") -> tuple[torch.Tensor, torch.Tensor]:
    """(speech, text) means, each [n utterances, n instructions, layers, d]."""
    speech, text = [], []
    total = len(utterances) * len(instructions)
    with tqdm(total=total, desc=f"eval: {desc}", unit="utt", disable=not progress) as bar:
        for start in range(0, len(utterances), batch_size):
            utts = utterances[start : start + batch_size]
            f = feats(utts)
            speech.append(torch.stack([_speech_means(model, ins, f) for ins in instructions], dim=1))
            text.append(torch.stack([_transcript_means(model, ins, transcripts[start : start + batch_size])
                                     for ins in instructions], dim=1))
            bar.update(len(utts) * len(instructions))
    return torch.cat(speech), torch.cat(text)


def mismatch_partners(transcripts: Sequence[str]) -> list[int | None]:
    """For each utterance, the next one (cyclically) whose transcript differs, after Whisper's
    normaliser: a corpus may hold the same sentence in several voices side by side (the demo's
    test set does), and pairing those would make the control a matched pair."""
    from .data import normalize_transcript

    keys = [normalize_transcript(t) for t in transcripts]
    n = len(keys)
    return [next(((i + step) % n for step in range(1, n) if keys[(i + step) % n] != keys[i]), None) for i in range(n)]


def centred_and_raw(speech: torch.Tensor, text: torch.Tensor, partners: Sequence[int | None] | None = None) -> dict:
    """The raw numbers, and the same after centring each modality on its own per-layer mean."""
    def centre(x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(dim=(0, 1), keepdim=True)  # over utterances and instructions: [1, 1, layers, d]

    return {**similarity_report(speech, text, partners),
            "centred": similarity_report(centre(speech), centre(text), partners)}


def similarity_report(speech: torch.Tensor, text: torch.Tensor, partners: Sequence[int | None] | None = None) -> dict:
    """Per-layer mean cosines of the three conditions and the instruction x instruction matrix.

    `speech`, `text`: [n, k instructions, layers, d]. The mismatched control pairs utterance i's
    speech with utterance `partners[i]`'s transcript (default i+1: a fixed derangement, so the
    numbers are reproducible); utterances without a partner are left out of it.
    """
    n, k = speech.shape[:2]
    cos = F.cosine_similarity(speech[:, :, None], text[:, None, :], dim=-1)  # [n, k_speech, k_text, layers]
    eye = torch.eye(k, dtype=torch.bool)
    same = cos[:, eye].mean(dim=(0, 1))
    different = cos[:, ~eye].mean(dim=(0, 1)) if k > 1 else None
    if partners is None:
        partners = [(i + 1) % n for i in range(n)] if n > 1 else [None]
    pairs = [(i, j) for i, j in enumerate(partners) if j is not None]
    mismatched = None
    if pairs:
        mine, theirs = zip(*pairs)
        mismatched = F.cosine_similarity(speech[list(mine)], text[list(theirs)], dim=-1).mean(dim=(0, 1))
    per_utt_same = cos[:, eye].mean(dim=1)  # [n, layers]
    return {
        "same_instruction": same.tolist(),
        "same_instruction_std": per_utt_same.std(0).tolist() if n > 1 else None,
        "different_instruction": different.tolist() if different is not None else None,
        "mismatched_utterance": mismatched.tolist() if mismatched is not None else None,
        "margin_over_mismatched": (same - mismatched).tolist() if mismatched is not None else None,
        "instruction_matrix": cos.mean(0).permute(2, 0, 1).tolist(),  # [layers][speech instr][text instr]
    }


@contextmanager
def swapped_adapter(model: BlspModel, path: str | Path) -> Iterator[dict]:
    """`model` with the trainable speech side of checkpoint `path` (its adapter, its CTC head when
    it compresses speech, its LoRA and trained encoder layers) in place of its own, for the
    duration; yields the checkpoint's identity. Refused when it was trained against other
    backbones, or trains other parts of them (another number of encoder layers, other LoRA)."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg = BlspConfig.from_pretrained(path)
    check_same_backbones(model, cfg, path)
    embeddings = token_embeddings(model.language_model)
    adapter = build_adapter(cfg, embeddings.shape[1])
    reader = build_reader(cfg, embeddings)
    if model.token_bridge is not None:  # no weights of its own: the same speech states read the same way
        reader.bridge = model.token_bridge
    param = next(model.adapter.parameters())
    own = (model.adapter, model.speech_reader)
    # The contrast's LoRA and encoder layers load into the model's own modules (shared with it):
    # a copy of their weights puts them back afterwards.
    own_state = {k: v.detach().clone() for k, v in model.trainable_state_dict().items()}
    model.adapter = adapter.to(param.device, param.dtype).eval()
    model.speech_reader = reader.to(param.device).eval()
    try:
        model.load_trainable_state_dict(load_file(str(path / ADAPTER_WEIGHTS)), path / ADAPTER_WEIGHTS)
        yield {"model_dir": str(path), "adapter_sha256": file_sha256(path / ADAPTER_WEIGHTS),
               "adapter_type": cfg.adapter_type, "speech_compression": cfg.speech_compression}
    finally:
        model.adapter, model.speech_reader = own
        model.load_trainable_state_dict(own_state, Path("(the model's own weights)"))


def check_same_backbones(model: BlspModel, cfg: BlspConfig, path: Path) -> None:
    """A contrast checkpoint must read the same encoder and LLM, and train the same parts of them:
    its encoder layers and LoRA load into the model's own modules (and the cached features are
    taken below the trained layers)."""
    for what, theirs, ours in (("encoder", cfg.encoder_fingerprint, model.config.encoder_fingerprint),
                               ("LLM", cfg.llm_fingerprint, model.config.llm_fingerprint)):
        if theirs and ours and theirs != ours:
            raise CheckpointError(f"{path}: the contrast adapter was trained against another {what} "
                                  f"({theirs}, this model's is {ours}); compare adapters of the same backbones")
    ours = (model.config.speech_states, model.config.speech_vectors, model.config.decoder_ids)
    if (cfg.speech_states, cfg.speech_vectors, cfg.decoder_ids) != ours:
        raise CheckpointError(f"{path}: the contrast reads {cfg.speech_states} states as {cfg.speech_vectors} vectors, "
                              f"this model {ours[0]} states as {ours[1]} (or Whisper decodes them otherwise); compare "
                              "models that read the same speech states")
    if cfg.encoder_trainable_layers != model.config.encoder_trainable_layers:
        raise CheckpointError(f"{path}: the contrast trains {cfg.encoder_trainable_layers} encoder layer(s), this "
                              f"model {model.config.encoder_trainable_layers}; compare models that train the same "
                              "encoder layers (--unfreeze-encoder-layers)")
    if (cfg.lora or None) != (model.config.lora or None):
        raise CheckpointError(f"{path}: the contrast's LoRA ({cfg.lora}) is not this model's ({model.config.lora}); "
                              "compare models with the same --lora-* settings")


def representation_report(model: BlspModel, utterances, transcripts: Sequence[str], feats,
                          instructions: Sequence[str], contrast_model: str | Path | None = None,
                          batch_size: int = 8, progress: bool = True) -> dict:
    """The similarity numbers for the model's adapter (row "blsp") and the contrast's ("contrast")."""
    was_training = model.training
    model.eval()
    partners = mismatch_partners(transcripts)
    try:
        models = {"blsp": centred_and_raw(*pooled_states(model, transcripts, feats, utterances, instructions,
                                                         batch_size, progress), partners)}
        contrast = None
        if contrast_model is not None:
            with swapped_adapter(model, contrast_model) as contrast:
                models["contrast"] = centred_and_raw(*pooled_states(
                    model, transcripts, feats, utterances, instructions, batch_size, progress,
                    "representation (contrast)"),
                    partners)
    finally:
        model.train(was_training)
    n_layers = len(models["blsp"]["same_instruction"])
    return {
        "n_utterances": len(utterances),
        "instructions": list(instructions),
        "layers": list(range(n_layers)),
        "layer_note": "0: the LLM's input (adapter output vs token embeddings); l: after decoder layer l "
                      "(the last after the final norm)",
        "pooling": "mean over the speech span / the transcript's tokens",
        "control": "mismatched: utterance i's speech vs the transcript of the next utterance with another sentence",
        "centring": "centred: each modality minus its own per-layer mean over the set's utterances and instructions",
        "models": models,
        "contrast_model": contrast,
    }


def plot_representation(report: dict, png_path: str | Path, title: str = "") -> None:
    """Cosine per layer, raw and centred (solid: the adapter, dashed: the contrast), and the
    centred numbers as a matrix (condition x layer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    layers = report["layers"]
    colors = {"same_instruction": "#5cb85c", "different_instruction": "#f0ad4e", "mismatched_utterance": "#999999"}
    fig, (raw_ax, centred_ax, mat) = plt.subplots(1, 3, figsize=(16, 4.4), gridspec_kw={"width_ratios": [1, 1, 1.2]})
    rows, names = [], []
    for model_name, style in (("blsp", "-"), ("contrast", "--")):
        sims = report["models"].get(model_name)
        if not sims:
            continue
        for cond in CONDITIONS:
            if sims.get(cond) is None:
                continue
            label = f"{model_name}: {cond.replace('_', ' ')}"
            marker = "." if style == "-" else None
            raw_ax.plot(layers, sims[cond], style, color=colors[cond], label=label, marker=marker)
            centred_ax.plot(layers, sims["centred"][cond], style, color=colors[cond], label=label, marker=marker)
            rows.append(sims["centred"][cond])
            names.append(label)
    for ax, what in ((raw_ax, "cosine"), (centred_ax, "centred cosine")):
        ax.set_xlabel("LLM layer (0 = input)")
        ax.set_ylabel(f"{what}(speech, transcript)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.set_title(f"{what}, mean-pooled states" + (f"\n{title}" if title else ""), fontsize=10)
    centred_ax.legend(fontsize=7)
    image = mat.imshow(rows, aspect="auto", cmap="viridis", vmin=min(-0.05, min(min(r) for r in rows)), vmax=1.0)
    mat.set_yticks(range(len(names)), names, fontsize=7)
    mat.set_xlabel("LLM layer")
    mat.xaxis.set_major_locator(MaxNLocator(integer=True))
    mat.set_title("centred cosine", fontsize=10)
    fig.colorbar(image, ax=mat, label="centred cosine")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
