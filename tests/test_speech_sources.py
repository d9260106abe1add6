"""The speech sources (blsp.speech_sources): encoder frames on the clip's actual length, trained top
layers, and Whisper's decoder states along its transcript."""

from __future__ import annotations

import pytest
import torch

from blsp.errors import BlspError
from blsp.modeling import BlspModel
from blsp.processing import Example
from blsp.prompts import CONTINUATION_INSTRUCTION
from blsp.whisper import run_whisper_encoder


def test_encoder_on_actual_length_matches_hf_on_a_full_window_and_is_batch_invariant(tiny_model):
    enc = tiny_model.audio_tower
    torch.manual_seed(0)
    full = torch.randn(1, 80, 3000)
    ours, n = run_whisper_encoder(enc, full, torch.tensor([3000]))
    theirs = enc(full).last_hidden_state
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert int(n) == 1500
    mels = [torch.randn(80, t) for t in (120, 333)]
    batch = torch.zeros(2, 80, 333)
    for i, m in enumerate(mels):
        batch[i, :, : m.shape[1]] = m
    out, lengths = run_whisper_encoder(enc, batch, torch.tensor([120, 333]))
    assert lengths.tolist() == [60, 167]
    for i, m in enumerate(mels):
        alone, _ = run_whisper_encoder(enc, m[None], torch.tensor([m.shape[1]]))
        torch.testing.assert_close(out[i, : int(lengths[i])], alone[0], rtol=1e-4, atol=1e-4)



def test_an_encoder_split_below_its_trained_top_layer_gives_the_whole_encoders_speech_vectors(tiny_dirs, tmp_path):
    whole = BlspModel.from_components(tiny_dirs["encoder"], tiny_dirs["llm"], seed=0)
    split = BlspModel.from_components(tiny_dirs["encoder"], tiny_dirs["llm"], seed=0)
    split.unfreeze_encoder_layers(1)  # the tiny encoder has 2 layers: the top one trains
    assert split.config.feature_key == f"{whole.config.encoder_fingerprint}-below-layer1"
    torch.manual_seed(0)
    mel, lengths = torch.randn(2, 80, 200), torch.tensor([200, 150])
    below, n = split.encode_mel(mel, lengths)  # what the cache holds: the frozen layer's output
    final, _ = whole.encode_mel(mel, lengths)
    assert not torch.allclose(below, final)
    speech, _ = split.speech_embeddings(below, n)
    torch.testing.assert_close(speech, whole.speech_embeddings(final, n)[0])

    speech.pow(2).mean().backward()
    top, bottom = split.audio_tower.layers[1], split.audio_tower.layers[0]
    assert all(p.grad is not None for p in [*top.parameters(), *split.audio_tower.layer_norm.parameters()])
    assert all(p.grad is None and not p.requires_grad for p in bottom.parameters())
    assert {id(p) for p in split.trainable_encoder_parameters()} <= {id(p) for p in split.trainable_parameters()}

    with torch.no_grad():
        top.fc1.weight.add_(0.05 * torch.randn_like(top.fc1.weight))
    split.save_pretrained(tmp_path / "ckpt")
    loaded = BlspModel.from_pretrained(tmp_path / "ckpt")  # the encoder's fingerprint: its frozen weights'
    assert loaded.config.encoder_trainable_layers == 1
    torch.testing.assert_close(loaded.audio_tower.layers[1].fc1.weight, top.fc1.weight)
    torch.testing.assert_close(loaded.speech_embeddings(*loaded.encode_mel(mel, lengths))[0],
                               split.speech_embeddings(below, n)[0])


def test_silence_after_the_clip_is_the_log_mel_of_zeros_after_its_audio():
    import numpy as np

    from blsp.audio import log_mel_spectrogram
    from blsp.speech_sources import with_silence

    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal(8000)).astype(np.float32)
    mel = log_mel_spectrogram(audio, 80)
    n = mel.shape[-1]
    reference = log_mel_spectrogram(np.concatenate([audio, np.zeros(8000, np.float32)]), 80)
    padded = with_silence(torch.nn.functional.pad(mel, (0, 7))[None], torch.tensor([n]), 2 * n)[0]
    torch.testing.assert_close(padded[:, :n], mel)
    # away from the edge, where the STFT window straddles both, the same as the audio's own
    torch.testing.assert_close(padded[:, n + 2:], reference[:, n + 2: 2 * n], atol=1e-5, rtol=0)


def test_decoder_windows_grow_with_the_clip_in_whole_seconds_between_5_and_30():
    from blsp.speech_sources import decoder_window

    assert [decoder_window(n) for n in (1, 100, 249, 251, 301, 1400, 1600, 3000)] == \
        [500, 500, 500, 600, 700, 2800, 3000, 3000]


@pytest.fixture
def decoder_model(tiny_whisper_dir, tiny_dirs):
    return BlspModel.from_components(tiny_whisper_dir, tiny_dirs["llm"], adapter_type="stack", adapter_downsample=1,
                                     speech_states="decoder", seed=0)


def mels(seconds: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    from blsp.audio import log_mel_spectrogram

    torch.manual_seed(0)
    clips = [log_mel_spectrogram((0.1 * torch.randn(int(16000 * s))).numpy(), 80) for s in seconds]
    lengths = torch.tensor([c.shape[-1] for c in clips])
    batch = torch.zeros(len(clips), 80, int(lengths.max()))
    for row, clip in enumerate(clips):
        batch[row, :, : clip.shape[-1]] = clip
    return batch, lengths


def test_a_decoder_states_model_reads_one_state_per_decoding_step_whatever_its_batch(decoder_model):
    assert decoder_model.speech_decoder is not None and decoder_model.config.speech_states == "decoder"
    assert "decoder" in decoder_model.config.feature_key
    mel, lengths = mels([0.5, 3.2, 1.0])
    states, steps = decoder_model.encode_mel(mel, lengths)
    assert states.shape[0] == 3 and states.shape[2] == 32 and int(steps.min()) >= 1
    for row in range(3):  # alone, each clip gives the same states
        alone, n = decoder_model.encode_mel(mel[row:row + 1, :, : lengths[row]], lengths[row:row + 1])
        assert int(n[0]) == int(steps[row])
        torch.testing.assert_close(alone[0, : n[0]], states[row, : steps[row]], atol=1e-5, rtol=1e-5)
    # the states are those of Whisper's greedy decoding of the clip in its window
    from blsp.speech_sources import decoder_window

    expected, kept = decoded_alone(decoder_model, mel[1:2], lengths[1:2], decoder_window(int(lengths[1])))
    if expected is None:  # the tiny Whisper was unsure of it there: decoded again in the full window
        expected, kept = decoded_alone(decoder_model, mel[1:2], lengths[1:2], 3000)
    assert int(steps[1]) == kept
    torch.testing.assert_close(states[1, :kept], expected[0, :kept], atol=1e-5, rtol=1e-5)


def decoded_alone(model, mel, lengths, width, unsure_below: float | None = None):
    """(states, how many the source keeps) of Whisper's greedy decoding of one clip in a window of
    `width` frames; (None, 0) where the source would find it unsure and decode it again."""
    from blsp import speech_sources as ss
    from blsp.whisper import greedy_decode, run_whisper_encoder

    weight, ids = model.speech_decoder.embed_tokens.weight, model.config.decoder_ids
    encoded, _ = run_whisper_encoder(model.audio_tower, ss.with_silence(mel, lengths, width), torch.tensor([width]))
    tokens, states, _, sure = greedy_decode(model.speech_decoder, weight, encoded, ids,
                                          ss.decoder_token_limit(int(lengths[0])))
    threshold = ss.UNSURE_LOGPROB if unsure_below is None else unsure_below
    unsure = (ss.repeats_itself(tokens[0])
              or float(sure[0]) < threshold)
    if unsure and width < ss.WHISPER_WINDOW_FRAMES:
        return None, 0
    return states, max(len(tokens[0]), 1)  # the states that chose its text tokens, not the one that chose to end


@pytest.mark.parametrize("unsure_below", [0.0, -float("inf")])
def test_a_clip_whisper_is_unsure_of_is_decoded_again_in_the_full_window(decoder_model, monkeypatch, unsure_below):
    """Every clip unsure (threshold 0): the states are the full 30 s window's; none: the short window's."""
    from blsp import speech_sources as ss

    monkeypatch.setattr(ss, "UNSURE_LOGPROB", unsure_below)
    monkeypatch.setattr(ss, "repeats_itself", lambda tokens: False)
    mel, lengths = mels([0.5, 3.2])
    states, steps = decoder_model.encode_mel(mel, lengths)
    for row in range(2):
        width = ss.decoder_window(int(lengths[row])) if unsure_below == -float("inf") else ss.WHISPER_WINDOW_FRAMES
        assert width < ss.WHISPER_WINDOW_FRAMES or unsure_below == 0.0
        expected, kept = decoded_alone(decoder_model, mel[row:row + 1, :, : lengths[row]], lengths[row:row + 1],
                                       width, unsure_below)
        assert int(steps[row]) == kept
        torch.testing.assert_close(states[row, :kept], expected[0, :kept], atol=1e-5, rtol=1e-5)


def continuation_batch(model, seconds: list[float]) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """A training batch of noise clips of these lengths under the continuation instruction,
    target "a b", and the clips' (mel, lengths)."""
    mel, lengths = mels(seconds)
    states, steps = model.encode_mel(mel, lengths)
    proc = model.processor
    examples = [Example(pieces=proc.speech_prompt(CONTINUATION_INSTRUCTION), features=[states[row, : steps[row]]],
                        target=proc.prompt.target_ids("a b")) for row in range(len(seconds))]
    return proc.collate(examples), mel, lengths


def test_a_decoder_states_model_trains_only_its_adapter_and_round_trips(decoder_model, tmp_path):
    batch, mel, lengths = continuation_batch(decoder_model, [0.7, 1.2])
    states, _ = decoder_model.encode_mel(mel, lengths)
    decoder_model.train()
    loss = decoder_model(**batch).loss
    loss.backward()
    assert all(p.grad is not None for p in decoder_model.adapter.parameters())
    assert all(not p.requires_grad for p in decoder_model.speech_decoder.parameters())
    assert not decoder_model.speech_decoder.training
    decoder_model.eval()
    decoder_model.save_pretrained(tmp_path / "ckpt")
    loaded = BlspModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.decoder_ids == decoder_model.config.decoder_ids
    assert loaded.config.feature_key == decoder_model.config.feature_key
    again, n = loaded.encode_mel(mel, lengths)
    torch.testing.assert_close(again, states)
    torch.testing.assert_close(loaded(**batch).loss, decoder_model(**batch).loss)


def test_decoder_states_need_whispers_tokenizer_and_keep_the_encoder_frozen(tiny_dirs, decoder_model):
    # conftest's tiny Whisper has no tokenizer beside it: nothing to prompt its decoder with
    with pytest.raises(BlspError, match="tokenizer"):
        BlspModel.from_components(tiny_dirs["encoder"], tiny_dirs["llm"], speech_states="decoder")
    with pytest.raises(BlspError, match="unknown speech states"):
        BlspModel.from_components(tiny_dirs["encoder"], tiny_dirs["llm"], speech_states="both")
    with pytest.raises(BlspError, match="speech-states decoder"):
        decoder_model.unfreeze_encoder_layers(1)
