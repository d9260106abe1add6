"""The model: adapter shapes, encoder on actual lengths, splicing, masking, padding, freezing, save/load."""

from __future__ import annotations

import pytest
import torch

from blsp.adapters import ConvAdapter, FrameStackAdapter
from blsp.llm import shared_prefix
from blsp.modeling import BlspModel
from blsp.processing import IGNORE_INDEX, SPEECH_TOKEN_ID
from blsp.readers.ctc import ctc_compress
from blsp.whisper import run_whisper_encoder
from blsp.errors import BlspError
from blsp.processing import Example
from blsp.prompts import AudioSlot, CONTINUATION_INSTRUCTION


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


def make_examples(model, n_frames=(40, 90, 17), targets=("hello world", "the quick brown fox jumps", "dog")):
    proc = model.processor
    prompt = proc.speech_prompt(CONTINUATION_INSTRUCTION)
    torch.manual_seed(1)
    d = model.config.encoder_config.d_model
    return [
        Example(pieces=prompt, features=[torch.randn(t, d)], target=proc.prompt.target_ids(text))
        for t, text in zip(n_frames, targets)
    ]


def test_labels_are_ignore_index_exactly_at_prompt_speech_and_padding(tiny_model):
    proc = tiny_model.processor
    examples = make_examples(tiny_model)
    batch = proc.collate(examples)
    assert batch["labels"].dtype == torch.long  # the original's bool labels taught BOS at speech
    for row, ex in enumerate(examples):
        ids, labels, mask = batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]
        n = int(mask.sum())
        t = len(ex.target)
        assert labels[n - t : n].tolist() == ex.target == ids[n - t : n].tolist()
        assert (labels[: n - t] == IGNORE_INDEX).all() and (labels[n:] == IGNORE_INDEX).all()
        n_speech = int((ids == SPEECH_TOKEN_ID).sum())
        assert n_speech == int(tiny_model.adapter.output_lengths(torch.tensor(ex.features[0].shape[0])))
        assert ex.target[-1] == proc.prompt.end_of_turn_id


def test_speech_and_transcript_prompts_share_every_token_outside_the_slot(tiny_model):
    proc = tiny_model.processor
    speech = proc.speech_prompt(CONTINUATION_INSTRUCTION)
    text = proc.transcript_prompt(CONTINUATION_INSTRUCTION, "hello world")
    assert isinstance(speech[1], AudioSlot) and len(speech) == 3
    flat = [t for p in text for t in p]
    assert flat[: len(speech[0])] == speech[0]
    assert flat[-len(speech[2]) :] == speech[2]
    middle = flat[len(speech[0]) : -len(speech[2])]
    assert proc.tokenizer.decode(middle) == " hello world"


def test_left_and_right_padding_give_the_same_logits_as_one_by_one(tiny_model):
    proc = tiny_model.processor
    examples = make_examples(tiny_model)
    outs = {}
    for side in ("left", "right"):
        batch = proc.collate(examples, padding_side=side)
        logits = tiny_model(**batch, return_logits=True).logits
        outs[side] = [logits[r][batch["attention_mask"][r].bool()] for r in range(len(examples))]
    for r, ex in enumerate(examples):
        alone = proc.collate([ex])
        ref = tiny_model(**alone, return_logits=True).logits[0]
        torch.testing.assert_close(outs["left"][r], ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(outs["right"][r], ref, rtol=1e-4, atol=1e-4)


def test_loss_is_the_mean_cross_entropy_over_target_tokens(tiny_model):
    proc = tiny_model.processor
    examples = make_examples(tiny_model)
    batch = proc.collate(examples)
    out = tiny_model(**batch, return_logits=True)
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-5)
    assert int(out.n_tokens) == sum(len(e.target) for e in examples)


def test_gradients_reach_only_the_adapter(tiny_model):
    batch = tiny_model.processor.collate(make_examples(tiny_model))
    tiny_model.train()
    tiny_model(**batch).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny_model.adapter.parameters())
    for part in (tiny_model.audio_tower, tiny_model.language_model):
        assert all(not p.requires_grad and p.grad is None for p in part.parameters())
        assert not part.training


def test_adapter_output_starts_at_the_llm_embedding_scale(tiny_model):
    emb_std = tiny_model.language_model.get_input_embeddings().weight.std().item()
    torch.testing.assert_close(tiny_model.adapter.norm.weight, torch.full_like(tiny_model.adapter.norm.weight, emb_std))


def test_save_and_load_round_trip(tiny_model, tmp_path):
    with torch.no_grad():
        for p in tiny_model.adapter.parameters():
            p.add_(0.01 * torch.randn_like(p))
    tiny_model.save_pretrained(tmp_path / "ckpt")
    files = sorted(f.name for f in (tmp_path / "ckpt").iterdir())
    assert files == ["adapter.safetensors", "config.json"]
    loaded = BlspModel.from_pretrained(tmp_path / "ckpt")
    for (k, a), (_, b) in zip(tiny_model.adapter.state_dict().items(), loaded.adapter.state_dict().items()):
        torch.testing.assert_close(a, b, msg=k)
    batch = tiny_model.processor.collate(make_examples(tiny_model))
    torch.testing.assert_close(loaded(**batch).loss, tiny_model(**batch).loss)


def test_saving_again_into_a_training_run_keeps_its_checkpoints_and_logs(tiny_model, tmp_path):
    """A resumed run saves its weights where an earlier save already put some: the run's other
    files (checkpoints, logs) must survive, and the new weights replace the old."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step-2").mkdir(parents=True)
    (run / "train_log.jsonl").write_text('{"step": 1}\n')
    tiny_model.save_pretrained(run)
    with torch.no_grad():
        tiny_model.adapter.norm.weight.add_(1.0)
    tiny_model.save_pretrained(run)
    assert sorted(f.name for f in run.iterdir()) == ["adapter.safetensors", "checkpoints", "config.json",
                                                     "train_log.jsonl"]
    assert (run / "checkpoints" / "step-2").is_dir() and (run / "train_log.jsonl").read_text() == '{"step": 1}\n'
    loaded = BlspModel.from_pretrained(run)
    torch.testing.assert_close(loaded.adapter.norm.weight, tiny_model.adapter.norm.weight)


def test_loading_against_another_llm_fails_loudly(tiny_model, tiny_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    from blsp.errors import CheckpointError

    tiny_model.save_pretrained(tmp_path / "ckpt")
    other = AutoModelForCausalLM.from_pretrained(tiny_dirs["llm"])
    torch.manual_seed(123)
    other.model.layers[0].mlp.down_proj.weight.data.normal_()
    other.save_pretrained(tmp_path / "other_llm")
    tiny_model.processor.tokenizer.save_pretrained(tmp_path / "other_llm")
    with pytest.raises(CheckpointError, match="fingerprint"):
        BlspModel.from_pretrained(tmp_path / "ckpt", llm=str(tmp_path / "other_llm"))
    BlspModel.from_pretrained(tmp_path / "ckpt", llm=str(tmp_path / "other_llm"), strict=False)


# ----------------------------------------------------------------------------------------------
# CTC compression of the speech
# ----------------------------------------------------------------------------------------------
def log_probs_reading(labels: list[list[int]], n_classes: int = 4) -> torch.Tensor:
    return torch.log_softmax(torch.nn.functional.one_hot(torch.tensor(labels), n_classes).float() * 10, -1)


def test_ctc_compress_drops_blanks_and_merges_each_run_into_its_mean():
    x = torch.arange(2 * 8 * 2, dtype=torch.float32).reshape(2, 8, 2)
    #          blank, a, a, blank, a, b, b, (padding)      all blank
    labels = [[0, 1, 1, 0, 1, 2, 2, 3], [0, 0, 0, 0, 0, 0, 0, 0]]
    log_probs = log_probs_reading(labels)
    log_probs[1, 2, 0] -= 1.0  # the second clip's least-blank frame is kept, so it is never empty
    out, keep = ctc_compress(x, torch.tensor([7, 5]), log_probs)
    assert keep.tolist() == [[False, True, False, False, True, True, False, False],
                             [False, False, True, False, False, False, False, False]]
    torch.testing.assert_close(out[0, 1], (x[0, 1] + x[0, 2]) / 2)
    torch.testing.assert_close(out[0, 4], x[0, 4])  # "a" again after a blank: a new token
    torch.testing.assert_close(out[0, 5], (x[0, 5] + x[0, 6]) / 2)
    torch.testing.assert_close(out[1, 2], x[1, 2])


def compressing_model(model, seed: int = 0, speech_vectors: str = "adapter"):
    vocab = list(range(5, 25))
    model.enable_ctc_compression(vocab, speech_vectors)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a head that reads some frames as blank and others as tokens
        model.ctc_head.blank.copy_(torch.randn(model.ctc_head.blank.shape, generator=g))
        model.ctc_head.scale.fill_(4.0)
    return model


def test_compressed_speech_equals_feeding_only_the_kept_vectors(tiny_model):
    """Masking dropped frames (no attention, no position) is the same as removing them."""
    model = compressing_model(tiny_model)
    proc = model.processor
    examples = make_examples(model)
    batch = proc.collate(examples)
    embeds, mask = model.prepare_inputs(batch["input_ids"], batch["attention_mask"], batch["encoder_features"],
                                        batch["encoder_lengths"])
    slots = batch["input_ids"] == SPEECH_TOKEN_ID
    dropped = slots & (mask == 0)
    assert dropped.any() and (slots & (mask == 1)).any()
    logits = model(**batch, return_logits=True).logits
    for r in range(len(examples)):
        keep = mask[r].bool()
        alone = model.language_model(inputs_embeds=embeds[r][keep][None]).logits[0]
        torch.testing.assert_close(logits[r][keep], alone, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("speech_vectors", ["adapter", "tokens"])
def test_compressing_model_saves_and_loads_its_ctc_head(tiny_model, tmp_path, speech_vectors):
    model = compressing_model(tiny_model, speech_vectors=speech_vectors)
    model.save_pretrained(tmp_path / "ckpt")
    loaded = BlspModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.speech_compression == "ctc" and loaded.config.ctc_vocab == list(range(5, 25))
    assert loaded.config.speech_vectors == speech_vectors
    torch.testing.assert_close(loaded.ctc_head.blank, model.ctc_head.blank)
    batch = model.processor.collate(make_examples(model))
    torch.testing.assert_close(loaded(**batch).loss, model(**batch).loss)


def test_token_vectors_are_the_heads_posterior_mix_of_token_embeddings(tiny_model):
    """speech_vectors "tokens": each kept vector is sum_c p(c | frame, not blank) * E[c]; a head
    sure of one token hands the LLM exactly that token's embedding."""
    model = compressing_model(tiny_model, speech_vectors="tokens")
    head = model.ctc_head
    x = torch.randn(2, 6, head.rows.shape[1])
    mix = head.token_mix(head(x))
    probs = torch.softmax(head(x)[..., 1:], -1)
    torch.testing.assert_close(mix, torch.einsum("bsc,cd->bsd", probs, head.rows))
    # Step 2's loss reaches the adapter through the mix (with "adapter" vectors too, but here the
    # adapter's own vectors never enter the LLM).
    batch = model.processor.collate(make_examples(model))
    model(**batch).loss.backward()
    assert model.adapter.fc1.weight.grad.abs().sum() > 0 and head.bias.grad.abs().sum() > 0
    with torch.no_grad():
        head.bias[1:].fill_(-1e4)
        head.bias[3] = 1e4  # always token vocab[2]
    torch.testing.assert_close(head.token_mix(head(x)), head.rows[2].expand(2, 6, -1))


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
@pytest.mark.parametrize("compress", [False, True], ids=["plain", "ctc-compressed"])
def test_a_cached_shared_prefix_gives_the_same_loss_and_gradients(tiny_model, compress):
    model = compressing_model(tiny_model) if compress else tiny_model
    batch = model.processor.collate(make_examples(model))
    prefix = shared_prefix(batch["input_ids"], batch["attention_mask"])
    first_slot = int((batch["input_ids"][0] == SPEECH_TOKEN_ID).nonzero()[0])
    assert 0 < len(prefix) <= first_slot
    results = []
    for use_prefix in (False, True, True):  # the third call reuses the stored keys and values
        model.zero_grad(set_to_none=True)
        out = model(**batch, shared_prefix=prefix if use_prefix else ())
        out.loss.backward()
        results.append((out.loss.detach(), [p.grad.clone() for p in model.adapter.parameters()]))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-5, atol=1e-6)
        for g, ref in zip(grads, results[0][1]):
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)


def test_prompts_taking_turns_keep_their_prefixes_cached(tiny_model, monkeypatch):
    """The alignment report's prompts alternate batch after batch: each prefix is computed once
    while at most PREFIX_CACHE_SIZE are in use, the least recently used one going first."""
    from blsp import llm

    decoder = tiny_model.language_model.get_decoder()
    calls = []
    monkeypatch.setattr(decoder, "forward", lambda *a, _f=decoder.forward, **k: calls.append(1) or _f(*a, **k))
    prefixes = [(1, 2, 3), (1, 2, 4), (5, 6)]
    get = lambda model, prefix, batch: model.prefix_cache.get(model.language_model, prefix, batch, torch.float32,
                                                              model.lora_off)
    for _ in range(3):
        for p in prefixes:
            get(tiny_model, p, 2)
    assert len(calls) == len(prefixes)
    get(tiny_model, prefixes[0], 2)  # used again: now the most recent
    get(tiny_model, (9,), 1)  # a fourth: all kept
    get(tiny_model, (10,), 1)  # a fifth: the least recently used goes
    assert len(calls) == len(prefixes) + 2 and len(tiny_model.prefix_cache) == llm.PREFIX_CACHE_SIZE
    get(tiny_model, prefixes[0], 2)
    assert len(calls) == len(prefixes) + 2  # kept: used after prefixes[1] was
    get(tiny_model, prefixes[1], 2)
    assert len(calls) == len(prefixes) + 3  # crowded out, computed again


def test_shared_prefix_stops_where_rows_differ_or_speech_begins():
    ids = torch.tensor([[1, 2, 3, SPEECH_TOKEN_ID, 9], [1, 2, 3, SPEECH_TOKEN_ID, 8]])
    assert shared_prefix(ids, torch.ones_like(ids)) == [1, 2, 3]
    ids[1, 2] = 7
    assert shared_prefix(ids, torch.ones_like(ids)) == [1, 2]


def test_shared_prefix_stops_short_of_the_first_scored_position():
    # One text-only row is the same as itself to the end: the prefix must still leave out every
    # position whose hidden state predicts a label (here position 2 predicts label 3's token).
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 4, 5]])
    assert shared_prefix(ids, torch.ones_like(ids), labels) == [1, 2]
    assert shared_prefix(ids, torch.ones_like(ids), torch.full_like(ids, IGNORE_INDEX)) == [1, 2, 3, 4]


@pytest.mark.parametrize("use_prefix", [False, True], ids=["whole-sequence", "shared-prefix"])
def test_llm_checkpointing_gives_the_same_loss_and_gradients_and_recomputes(tiny_model, use_prefix):
    model = tiny_model
    batch = model.processor.collate(make_examples(model))
    prefix = shared_prefix(batch["input_ids"], batch["attention_mask"]) if use_prefix else ()
    calls = []
    mlp = model.language_model.get_decoder().layers[0].mlp
    mlp.forward = lambda x, forward=mlp.forward: calls.append(1) or forward(x)  # (hooks do not see a recompute)
    with torch.no_grad():
        model(**batch, shared_prefix=prefix)  # computes and keeps the prefix's keys and values
    results = []
    try:
        for checkpointing in (False, True):
            model.set_llm_checkpointing(checkpointing)
            model.zero_grad(set_to_none=True)
            calls.clear()
            out = model(**batch, shared_prefix=prefix)
            out.loss.backward()
            results.append((out.loss.detach(), [p.grad.clone() for p in model.adapter.parameters()], len(calls)))
    finally:
        model.set_llm_checkpointing(False)
        del mlp.forward
    (loss, grads, calls_plain), (loss_ckpt, grads_ckpt, calls_ckpt) = results
    assert (calls_plain, calls_ckpt) == (1, 2)  # the layer ran again in backward: it was checkpointed
    torch.testing.assert_close(loss_ckpt, loss, rtol=1e-6, atol=1e-7)
    for g, ref in zip(grads_ckpt, grads):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in model.language_model.parameters())


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
    from blsp.whisper import greedy_decode

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
    from blsp.speech_sources import decoder_token_limit, decoder_window, with_silence
    from blsp.whisper import run_whisper_encoder

    width = decoder_window(int(lengths[1]))
    encoded, _ = run_whisper_encoder(decoder_model.audio_tower, with_silence(mel[1:2], lengths[1:2], width),
                                     torch.tensor([width]))
    tokens, expected, _ = greedy_decode(decoder_model.speech_decoder, decoder_model.speech_decoder.embed_tokens.weight,
                                        encoded, decoder_model.config.decoder_ids, decoder_token_limit(int(lengths[1])))
    kept = max(len(tokens[0]), 1)  # the states that chose its text tokens, not the one that chose to end
    assert int(steps[1]) == kept
    torch.testing.assert_close(states[1, :kept], expected[0, :kept], atol=1e-5, rtol=1e-5)


def test_a_decoder_states_model_trains_only_its_adapter_and_round_trips(decoder_model, tmp_path):
    mel, lengths = mels([0.7, 1.2])
    states, steps = decoder_model.encode_mel(mel, lengths)
    proc = decoder_model.processor
    examples = [Example(pieces=proc.speech_prompt(CONTINUATION_INSTRUCTION), features=[states[row, : steps[row]]],
                        target=proc.prompt.target_ids("a b")) for row in range(2)]
    batch = proc.collate(examples)
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
