"""The token bridge: Whisper's decoder states read as the LLM embeddings of Whisper's likeliest tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from blsp.readers.bridge import TokenBridge, bridge_pieces, bridge_table
from blsp.errors import BlspError, CheckpointError
from blsp.modeling import BlspConfig, BlspModel

from conftest import assert_loss_batch_invariant


@pytest.fixture
def tokenizers(tiny_whisper_dir, tiny_dirs):
    return AutoTokenizer.from_pretrained(tiny_whisper_dir), AutoTokenizer.from_pretrained(tiny_dirs["llm"])


def test_each_whisper_token_maps_to_the_mean_embedding_of_its_texts_llm_tokens(tokenizers):
    whisper, llm = tokenizers
    n_text = whisper.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(0)
    embeddings = torch.randn(len(llm), 6)
    table = bridge_table(bridge_pieces(whisper, llm, n_text), embeddings)
    assert table.shape == (n_text, 6)
    checked = 0
    for token in range(n_text):
        pieces = llm(whisper.decode([token]), add_special_tokens=False).input_ids
        expected = embeddings[pieces].mean(0) if pieces else torch.zeros(6)
        torch.testing.assert_close(table[token], expected)
        checked += len(pieces) > 1
    assert checked, "some Whisper token should split into several LLM tokens"


def test_a_sure_state_reads_as_its_tokens_row_and_an_unsure_one_as_the_posterior_mix():
    torch.manual_seed(0)
    weight = torch.randn(12, 4)  # Whisper's output projection: 10 text tokens, then 2 special ones
    table = torch.randn(10, 3)
    bridge = TokenBridge(table, top_k=10)
    sure = 50 * weight[7]
    torch.testing.assert_close(bridge(sure[None, None], weight)[0, 0], table[7], atol=1e-4, rtol=0)
    state = torch.randn(4)
    probs = torch.softmax(state @ weight[:10].T, -1)
    torch.testing.assert_close(bridge(state[None, None], weight)[0, 0], probs @ table, atol=1e-5, rtol=1e-5)
    # top-k: only the k likeliest tokens, their posterior renormalised
    top = TokenBridge(table, top_k=2)(state[None, None], weight)[0, 0]
    best = probs.topk(2)
    torch.testing.assert_close(top, (best.values / best.values.sum()) @ table[best.indices], atol=1e-5, rtol=1e-5)


def test_a_new_bridge_model_reads_the_bridge_alone_and_its_adapter_learns_a_correction(tiny_whisper_dir, tiny_dirs,
                                                                                        tmp_path):
    model = BlspModel.from_components(tiny_whisper_dir, tiny_dirs["llm"], adapter_type="stack", adapter_downsample=1,
                                      speech_states="decoder", speech_vectors="tokens")
    torch.manual_seed(0)
    states, lengths = torch.randn(2, 5, 32), torch.tensor([5, 3])
    vectors, out_lengths = model.speech_embeddings(states, lengths)
    bridge = model.token_bridge(states, model.speech_decoder.embed_tokens.weight)
    torch.testing.assert_close(vectors, bridge)  # the adapter starts at nothing
    assert out_lengths.tolist() == [5, 3]
    with torch.no_grad():
        model.adapter.norm.weight.fill_(0.1)
    moved, _ = model.speech_embeddings(states, lengths)
    assert (moved - bridge).abs().max() > 1e-3
    model.save_pretrained(tmp_path / "ckpt")
    loaded = BlspModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.token_bridge is not None
    torch.testing.assert_close(loaded.speech_embeddings(states, lengths)[0], moved)


def test_a_saved_bridge_model_refuses_tokenizers_that_map_tokens_otherwise(tiny_whisper_dir, tiny_dirs, tmp_path):
    model = BlspModel.from_components(tiny_whisper_dir, tiny_dirs["llm"], adapter_type="stack", adapter_downsample=1,
                                      speech_states="decoder", speech_vectors="tokens")
    assert len(model.config.bridge_fingerprint) == 16
    model.config.bridge_fingerprint = "0" * 16  # as if trained with other tokenizers
    model.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="token bridge was built from other tokenizers"):
        BlspModel.from_pretrained(tmp_path / "ckpt")
    assert BlspModel.from_pretrained(tmp_path / "ckpt", strict=False).token_bridge is not None


def test_the_bridge_needs_one_adapter_vector_per_state():
    from blsp.options import TrainOptions

    with pytest.raises(BlspError, match="--adapter stack --adapter-downsample 1"):
        TrainOptions.from_flat(speech_states="decoder", speech_vectors="tokens")  # the paper's conv adapter at 8
    with pytest.raises(BlspError, match="--adapter stack --adapter-downsample 1"):
        BlspConfig(adapter_type="stack", adapter_downsample=2, speech_states="decoder", speech_vectors="tokens",
                   decoder_ids={"prompt": [1], "eot": 0})


def test_a_state_whisper_is_sure_of_reads_as_its_token_itself_and_an_unsure_one_as_the_mix():
    torch.manual_seed(0)
    weight = torch.randn(12, 4)
    table = torch.randn(10, 3)
    single = torch.ones(10, dtype=torch.bool)
    single[5] = False  # token 5 splits into several LLM tokens: never read as "itself"
    bridge = TokenBridge(table, top_k=3, single=single, never=[2])
    sure_state, unsure_state = 50 * weight[7], torch.zeros(4)
    states = torch.stack([sure_state, unsure_state, 50 * weight[5], 50 * weight[2]])[None]
    mix, sure, exact = bridge.read(states, weight, confidence=0.9)
    assert sure[0].tolist() == [True, False, False, False]  # 2 is never emitted, 5 is not one LLM token
    torch.testing.assert_close(exact[0, 0], table[7])
    assert exact[0, 3].ne(table[2]).any()  # Whisper's greedy token there is not the suppressed one
    torch.testing.assert_close(mix, bridge(states, weight))  # the mix is the bridge's as before
    assert bridge.read(states, weight)[1] is None  # no confidence: no sure tokens
    # confidence 0: every single-piece greedy token is read as itself (the cascade's input)
    logits = (states[0] @ weight[:10].T).index_fill(-1, torch.tensor([2]), -torch.inf)
    expected = single[logits.argmax(-1)]
    assert bridge.read(states, weight, confidence=0.0)[1][0].tolist() == expected.tolist()
    assert expected[:3].tolist() == [True, True, False]


def test_a_bridge_model_with_a_confidence_skips_the_correction_on_sure_tokens_and_saves_it(tiny_whisper_dir, tiny_dirs,
                                                                                          tmp_path):
    model = BlspModel.from_components(tiny_whisper_dir, tiny_dirs["llm"], adapter_type="stack", adapter_downsample=1,
                                      speech_states="decoder", speech_vectors="tokens", bridge_confidence=0.0)
    torch.manual_seed(0)
    states, lengths = torch.randn(2, 5, 32), torch.tensor([5, 3])
    with torch.no_grad():
        model.adapter.norm.weight.fill_(0.1)  # a correction that moves every vector
    vectors, _ = model.speech_embeddings(states, lengths)
    weight = model.speech_decoder.embed_tokens.weight
    mix, sure, exact = model.token_bridge.read(states, weight, 0.0)
    assert sure.any()
    torch.testing.assert_close(vectors[sure], exact[sure])  # read as the tokens themselves
    assert (vectors[~sure] - mix[~sure]).abs().max() > 1e-3  # corrected where Whisper's token is not one LLM token
    model.save_pretrained(tmp_path / "ckpt")
    loaded = BlspModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.bridge_confidence == 0.0
    torch.testing.assert_close(loaded.speech_embeddings(states, lengths)[0], vectors)


def test_a_bridge_confidence_outside_0_1_or_without_the_bridge_is_refused(tiny_whisper_dir, tiny_dirs):
    with pytest.raises(BlspError, match="between 0 and 1"):
        BlspConfig(speech_states="decoder", speech_vectors="tokens", adapter_type="stack", adapter_downsample=1,
                   decoder_ids={"eot": 1}, bridge_confidence=1.5)


# ----------------------------------------------------------------------------------------------
# The transcript bridge: Whisper's greedy transcript as the LLM's tokenizer splits it
# ----------------------------------------------------------------------------------------------
def test_a_transcript_becomes_the_llms_tokens_of_its_text_each_owned_by_the_whisper_token_holding_it(tokenizers):
    from blsp.readers.bridge import TranscriptTokens

    whisper, llm = tokenizers
    text = " The wizard vanished behind the curtain, whispered Montreal."
    said = whisper(text, add_special_tokens=False).input_ids
    ids, owners = TranscriptTokens(whisper, llm)(said)
    assert ids == llm(" " + text.strip(), add_special_tokens=False).input_ids  # what the text path reads
    assert owners == sorted(owners) and 0 <= owners[0] and owners[-1] == len(said) - 1
    # each LLM token's first character lies in the text of the Whisper token that owns it
    pieces = [whisper.decode([t]) for t in said]
    starts = [sum(map(len, pieces[:k])) for k in range(len(pieces))]
    for (start, _), owner in zip(llm(" " + text.strip(), add_special_tokens=False,
                                     return_offsets_mapping=True)["offset_mapping"], owners):
        char = max(start - 1, 0) + (len(text) - len(text.lstrip()))
        assert starts[owner] <= char < starts[owner] + len(pieces[owner])
    assert TranscriptTokens(whisper, llm)([]) == ([], [])


def _transcript_model(tiny_whisper_dir, tiny_dirs, **kwargs):
    return BlspModel.from_components(tiny_whisper_dir, tiny_dirs["llm"], adapter_type="stack", adapter_downsample=1,
                                     speech_states="decoder", speech_vectors="tokens", bridge_transcript=True, **kwargs)


def said_states(model, whisper, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder states whose greedy tokens spell each text (a state far along its token's own row)."""
    weight = model.speech_decoder.embed_tokens.weight.detach()
    rows = [whisper(t, add_special_tokens=False).input_ids for t in texts]
    states = torch.zeros(len(rows), max(map(len, rows)), weight.shape[1])
    for k, ids in enumerate(rows):
        states[k, : len(ids)] = 50 * weight[ids]
    return states, torch.tensor([len(ids) for ids in rows])


def test_the_transcript_bridge_reads_whispers_greedy_text_as_the_llms_own_tokens_in_the_first_slots(
        tiny_whisper_dir, tiny_dirs, tmp_path):
    model = _transcript_model(tiny_whisper_dir, tiny_dirs)
    whisper = AutoTokenizer.from_pretrained(tiny_whisper_dir)
    llm = model.processor.tokenizer
    texts = [" The wizard whispered.", " Hello there"]
    states, lengths = said_states(model, whisper, texts)
    width = states.shape[1]
    assert model.speech_slots(width) == 2 * width  # two slots a state
    _, vectors, keep, slots = model.speech_reader.read(*model._adapted(states, lengths), model.speech_source)
    assert slots.tolist() == (2 * lengths).tolist() and vectors.shape[1] == 2 * width
    embeddings = model.language_model.get_input_embeddings().weight
    for row, text in enumerate(texts):
        expected = llm(" " + text.strip(), add_special_tokens=False).input_ids
        assert keep[row].sum() == len(expected) and keep[row, : len(expected)].all()
        torch.testing.assert_close(vectors[row, : len(expected)], embeddings[expected])  # the adapter starts at nothing
    # a trained correction moves each token by its owner state's vector; it round-trips
    with torch.no_grad():
        model.adapter.norm.weight.fill_(0.1)
    _, moved, keep2, _ = model.speech_reader.read(*model._adapted(states, lengths), model.speech_source)
    assert torch.equal(keep, keep2) and (moved[keep] - vectors[keep]).abs().max() > 1e-3
    model.save_pretrained(tmp_path / "ckpt")
    loaded = BlspModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.bridge_transcript and loaded.speech_slots(width) == 2 * width
    _, again, _, _ = loaded.speech_reader.read(*loaded._adapted(states, lengths), loaded.speech_source)
    torch.testing.assert_close(again[keep], moved[keep])


def test_a_transcript_longer_than_its_slots_is_read_state_by_state(tiny_whisper_dir, tiny_dirs):
    model = _transcript_model(tiny_whisper_dir, tiny_dirs)
    torch.manual_seed(0)  # random states: the tiny Whisper's rare tokens split into many LLM tokens
    states, lengths = torch.randn(1, 5, 32), torch.tensor([5])
    greedy, _ = model.token_bridge.greedy(states, model.speech_decoder.embed_tokens.weight)
    ids, _ = model.speech_reader.transcript(greedy[0].tolist())
    assert len(ids) > 10, "the random states should spell more LLM tokens than slots, or this checks nothing"
    corrected, vectors, keep, _ = model.speech_reader.read(*model._adapted(states, lengths), model.speech_source)
    assert keep[0].tolist() == [True] * 5 + [False] * 5
    torch.testing.assert_close(vectors[0, :5], corrected[0])


def test_a_transcript_bridge_models_loss_on_a_clip_does_not_depend_on_its_batch(tiny_whisper_dir, tiny_dirs):
    """The unused slots are masked and take no position: a clip's loss is the same alone or batched."""
    model = _transcript_model(tiny_whisper_dir, tiny_dirs).eval()
    with torch.no_grad():
        model.adapter.norm.weight.fill_(0.1)
    torch.manual_seed(0)
    states, lengths = torch.randn(2, 5, 32), torch.tensor([5, 3])
    assert_loss_batch_invariant(model, [states[k, : lengths[k]] for k in range(2)])


def test_bridge_transcript_needs_the_token_bridge():
    from blsp.options import TrainOptions, check_options

    with pytest.raises(BlspError, match="--bridge-transcript"):
        check_options(TrainOptions.from_flat(bridge_transcript=True, speech_states="encoder"))


def test_an_evaluation_turns_the_transcript_bridge_on_or_off_whatever_the_model_was_trained_with(
        tiny_whisper_dir, tiny_dirs, monkeypatch):
    from blsp import evaluation, speech_sources

    model = _transcript_model(tiny_whisper_dir, tiny_dirs)
    monkeypatch.setattr(speech_sources, "decoder_tokenizer", lambda name: AutoTokenizer.from_pretrained(tiny_whisper_dir))
    evaluation.set_bridge_transcript(model, False)  # `blsp eval --no-bridge-transcript`
    assert not model.config.bridge_transcript and model.speech_slots(5) == 5
    evaluation.set_bridge_transcript(model, True)
    assert model.config.bridge_transcript and model.speech_slots(5) == 10
