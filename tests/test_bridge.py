"""The token bridge: Whisper's decoder states read as the LLM embeddings of Whisper's likeliest tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from blsp.readers.bridge import TokenBridge, bridge_pieces, bridge_table
from blsp.errors import BlspError, CheckpointError
from blsp.modeling import BlspConfig, BlspModel


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
