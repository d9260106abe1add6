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
