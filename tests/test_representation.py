"""Representation analysis: spans, pooling and the cosine conditions on tiny models and on
tensors whose answers are known."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import write_corpus

from blsp.data import load_utterance_audio, read_manifest
from blsp.errors import CheckpointError
from blsp.features import encode_waveforms
from blsp.prompts import CONTINUATION_INSTRUCTION
from blsp.representation import (
    _speech_means,
    _transcript_means,
    centred_and_raw,
    mismatch_partners,
    representation_report,
    similarity_report,
    swapped_adapter,
    transcript_span,
)


def test_the_transcript_span_holds_exactly_the_transcript(tiny_model):
    ids, start, end = transcript_span(tiny_model, CONTINUATION_INSTRUCTION, "the quick brown fox")
    tok = tiny_model.processor.tokenizer
    assert tok.decode(ids[start:end]).strip() == "the quick brown fox"
    assert tok.decode(ids[:start]).endswith(CONTINUATION_INSTRUCTION)


def test_pooling_ignores_batch_padding(tiny_model, tmp_path):
    utts = read_manifest(write_corpus(tmp_path, n=3)).utterances
    feats = encode_waveforms(tiny_model, [load_utterance_audio(u) for u in utts])
    texts = [u.text for u in utts]
    with torch.no_grad():
        batch_speech = _speech_means(tiny_model, CONTINUATION_INSTRUCTION, feats)
        batch_text = _transcript_means(tiny_model, CONTINUATION_INSTRUCTION, texts)
        for i in range(3):
            alone = _speech_means(tiny_model, CONTINUATION_INSTRUCTION, feats[i : i + 1])[0]
            assert torch.allclose(batch_speech[i], alone, atol=1e-5)
            alone = _transcript_means(tiny_model, CONTINUATION_INSTRUCTION, texts[i : i + 1])[0]
            assert torch.allclose(batch_text[i], alone, atol=1e-5)
    n_layers = tiny_model.language_model.config.num_hidden_layers + 1
    assert batch_speech.shape == (3, n_layers, tiny_model.language_model.config.hidden_size)
    # layer 0 of the transcript is the mean of its token embeddings
    ids, start, end = transcript_span(tiny_model, CONTINUATION_INSTRUCTION, texts[0])
    emb = tiny_model.language_model.get_input_embeddings().weight[ids[start:end]].mean(0)
    assert torch.allclose(batch_text[0, 0], emb, atol=1e-6)


def test_similarity_conditions_on_known_tensors():
    torch.manual_seed(0)
    n, k, layers, d = 4, 2, 3, 8
    text = torch.randn(n, k, layers, d)
    same = similarity_report(text.clone(), text)
    assert same["same_instruction"] == pytest.approx([1.0] * layers)
    # mismatched pairs utterance i's speech with utterance i+1's transcript
    expected = torch.stack([F.cosine_similarity(text[i], text[(i + 1) % n], dim=-1) for i in range(n)]).mean((0, 1))
    assert same["mismatched_utterance"] == pytest.approx(expected.tolist(), abs=1e-6)
    expected = torch.stack([F.cosine_similarity(text[:, 0], text[:, 1], dim=-1),
                            F.cosine_similarity(text[:, 1], text[:, 0], dim=-1)]).mean((0, 1))
    assert same["different_instruction"] == pytest.approx(expected.tolist(), abs=1e-6)
    assert same["margin_over_mismatched"] == pytest.approx([1 - m for m in same["mismatched_utterance"]], abs=1e-6)
    assert len(same["instruction_matrix"]) == layers and same["instruction_matrix"][0][0][0] == pytest.approx(1.0)
    opposite = similarity_report(-text, text)
    assert opposite["same_instruction"] == pytest.approx([-1.0] * layers)
    # a large offset shared by all speech states, another by all transcripts: raw cosines say
    # little, centred ones recover the per-utterance agreement
    speech_side, text_side = text + 5.0, 2 * text - 3.0
    both = centred_and_raw(speech_side, text_side)
    assert max(both["same_instruction"]) < 0  # the offsets point apart: raw, even the matched pair looks opposite
    centred = both["centred"]
    mean = text.mean(dim=(0, 1), keepdim=True)
    exact = similarity_report(text - mean, text - mean)
    assert centred["same_instruction"] == pytest.approx([1.0] * layers, abs=1e-5)
    assert centred["mismatched_utterance"] == pytest.approx(exact["mismatched_utterance"], abs=1e-5)
    one = similarity_report(text[:1, :1], text[:1, :1])
    assert one["different_instruction"] is None and one["mismatched_utterance"] is None


def test_the_contrast_adapter_is_swapped_in_and_back(tiny_model, tmp_path):
    utts = read_manifest(write_corpus(tmp_path / "d", n=2)).utterances
    feats = encode_waveforms(tiny_model, [load_utterance_audio(u) for u in utts])

    def features(batch):
        return [feats[utts.index(u)] for u in batch]

    other = type(tiny_model).from_components(tiny_model.config.encoder_name, tiny_model.config.llm_name, seed=7)
    other.save_pretrained(tmp_path / "other")
    own = tiny_model.adapter
    report = representation_report(tiny_model, utts, [u.text for u in utts], features,
                                   [CONTINUATION_INSTRUCTION], contrast_model=tmp_path / "other", progress=False)
    assert tiny_model.adapter is own
    blsp, contrast = report["models"]["blsp"], report["models"]["contrast"]
    assert blsp["same_instruction"][1:] != pytest.approx(contrast["same_instruction"][1:])  # another adapter
    # the input-side text is the same token embeddings, so layer 0 differs only by the speech side
    direct = representation_report(other, utts, [u.text for u in utts], features, [CONTINUATION_INSTRUCTION],
                                   progress=False)
    assert direct["models"]["blsp"]["same_instruction"] == pytest.approx(contrast["same_instruction"], abs=1e-5)
    assert report["contrast_model"]["adapter_sha256"]

    other.config.llm_fingerprint = "0" * 16
    other.save_pretrained(tmp_path / "alien")
    with pytest.raises(CheckpointError, match="another LLM"):
        with swapped_adapter(tiny_model, tmp_path / "alien"):
            pass
    assert tiny_model.adapter is own


def test_the_control_never_pairs_two_voices_of_one_sentence():
    # the demo's test set: each sentence in two voices, side by side
    texts = ["A cat sat.", "a cat sat", "The dog ran.", "the dog ran!", "Birds sing."]
    assert mismatch_partners(texts) == [2, 2, 4, 4, 0]
    assert mismatch_partners(["same", "Same."]) == [None, None]
    speech = torch.randn(2, 1, 2, 4)
    assert similarity_report(speech, speech, [None, None])["mismatched_utterance"] is None


def test_a_compressing_contrast_brings_its_ctc_head(tiny_model, tmp_path):
    """A contrast adapter that drops speech frames (CTC compression) is swapped in with its head,
    and only the frames it keeps are pooled: the numbers equal those of that model itself."""
    from conftest import compressing_model

    utts = read_manifest(write_corpus(tmp_path / "d", n=2, seconds=1.5)).utterances
    feats = encode_waveforms(tiny_model, [load_utterance_audio(u) for u in utts])

    def features(batch):
        return [feats[utts.index(u)] for u in batch]

    other = compressing_model(type(tiny_model).from_components(tiny_model.config.encoder_name,
                                                                tiny_model.config.llm_name, seed=3))
    other.save_pretrained(tmp_path / "ctc")
    with torch.no_grad():
        kept = other.prepare_inputs(*[other.processor.collate([_example(other, feats[0])])[k] for k in
                                      ("input_ids", "attention_mask", "encoder_features", "encoder_lengths")])[1]
    assert 0 < int(kept.sum()) < kept.shape[1]  # some speech frames dropped, some kept
    args = (utts, [u.text for u in utts], features, [CONTINUATION_INSTRUCTION])
    swapped = representation_report(tiny_model, *args, contrast_model=tmp_path / "ctc", progress=False)
    assert tiny_model.ctc_head is None and swapped["contrast_model"]["speech_compression"] == "ctc"
    direct = representation_report(other, *args, progress=False)
    assert swapped["models"]["contrast"]["same_instruction"] == pytest.approx(
        direct["models"]["blsp"]["same_instruction"], abs=1e-5)


def _example(model, feats):
    from blsp.processing import Example

    return Example(model.processor.speech_prompt(CONTINUATION_INSTRUCTION), [feats])


def test_the_swap_puts_back_the_models_own_lora_and_encoder_layers(tiny_model, tmp_path):
    """The contrast's LoRA and trained encoder layers load into the model's own modules for the
    swap; afterwards every weight of the model is its own again."""
    from blsp.lora import LoraSettings

    def training_more(model, seed):
        model.unfreeze_encoder_layers(1)
        model.enable_lora(LoraSettings(rank=2))
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # as if trained: every trainable weight moved
            for p in model.trainable_parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
        return model

    build = lambda seed: type(tiny_model).from_components(tiny_model.config.encoder_name, tiny_model.config.llm_name,
                                                          seed=seed)
    model, other = training_more(tiny_model, 0), training_more(build(7), 1)
    other.save_pretrained(tmp_path / "other")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    theirs = other.trainable_state_dict()
    with swapped_adapter(model, tmp_path / "other"):
        inside = model.trainable_state_dict()
        assert any(k.startswith("audio_tower.") for k in theirs) and any("lora" in k for k in theirs)
        assert inside.keys() == theirs.keys() and all(torch.equal(inside[k], theirs[k]) for k in theirs)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)

    build(3).save_pretrained(tmp_path / "plain")  # trains no encoder layer, has no LoRA
    with pytest.raises(CheckpointError, match="the contrast trains 0 encoder layer"):
        with swapped_adapter(model, tmp_path / "plain"):
            pass
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
