"""The voice channel: voice statistics cached at the head of a clip's features, read as a few LLM
vectors before the words (blsp.voice_channel, blsp.modeling)."""

import pytest
import torch

from blsp.errors import BlspError
from blsp.modeling import BlspModel
from blsp.processing import SPEECH_TOKEN_ID, Example
from blsp.voice_channel import (STATISTICS, VoiceChannel, default_voice_layers, split_voice_rows, voice_rows,
                                voice_statistics)
from test_speech_sources import continuation_batch, mels


def test_voice_statistics_are_mean_std_and_change_over_the_clips_own_frames():
    h = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [2.0, 0.0], [100.0, 0.0]]])  # the last frame: padding
    rows = voice_statistics([h], frames=torch.tensor([3]), seconds=torch.tensor([2.0]), tokens=torch.tensor([8]))
    assert rows.shape == (1, len(STATISTICS) + 1, 2)
    mean, std, delta, log_seconds = rows[0, :, 0].tolist()
    assert mean == pytest.approx(2.0)
    assert std == pytest.approx((2 / 3) ** 0.5)
    assert delta == pytest.approx(1.5)  # |3-1| and |2-3|: the padding's jump is not counted
    assert log_seconds == pytest.approx(torch.tensor(2.0).log().item())
    assert rows[0, -1, 1] == pytest.approx(8 / 2 / 4)  # tokens a second, over 4


def test_default_voice_layers_sit_a_third_and_two_thirds_up():
    assert default_voice_layers(6) == (2, 4)
    assert default_voice_layers(2) == (1,)
    assert default_voice_layers(32) == (10, 21)


@pytest.fixture
def voiced_decoder_model(tiny_whisper_dir, tiny_dirs):
    return BlspModel.from_components(tiny_whisper_dir, tiny_dirs["llm"], adapter_type="stack", adapter_downsample=1,
                                     speech_states="decoder", seed=0, voice_vectors=3)


def test_voice_rows_head_the_features_and_the_llm_reads_voice_vectors_first(voiced_decoder_model, tiny_whisper_dir,
                                                                             tiny_dirs):
    model = voiced_decoder_model
    plain = BlspModel.from_components(tiny_whisper_dir, tiny_dirs["llm"], adapter_type="stack", adapter_downsample=1,
                                      speech_states="decoder", seed=0)
    assert model.config.voice_layers == [1] and plain.config.voice_vectors == 0
    assert model.config.feature_key == plain.config.feature_key + "-voice1"
    mel, lengths = mels([0.5, 2.2])
    feats, n = model.encode_mel(mel, lengths)
    words, m = plain.encode_mel(mel, lengths)
    r = voice_rows(model.config)
    assert r == len(STATISTICS) + 1
    torch.testing.assert_close(n, m + r)
    # the words' features are the plain source's, behind the voice rows
    for row in range(2):
        torch.testing.assert_close(feats[row, r : n[row]], words[row, : m[row]])
    # a clip's voice rows do not depend on what it was batched with
    alone, _ = model.encode_mel(mel[1:2, :, : lengths[1]], lengths[1:2])
    torch.testing.assert_close(alone[0, :r], feats[1, :r], atol=1e-5, rtol=1e-5)
    # the scalar row: log seconds, and tokens a second over 4
    seconds = lengths.float() / 100
    torch.testing.assert_close(feats[:, r - 1, 0], seconds.log())
    torch.testing.assert_close(feats[:, r - 1, 1], m.float() / seconds / 4)
    # the processor counts the voice vectors among the speech slots
    proc = model.processor
    assert proc.speech_lengths(int(n[0])) == 3 + int(m[0])


def test_voice_channel_trains_round_trips_and_changes_what_the_llm_reads(voiced_decoder_model, tmp_path):
    model = voiced_decoder_model
    batch, _, _ = continuation_batch(model, [0.7, 1.2])
    # a clip of fewer words than voice rows reads its voice too (the check counts feature rows)
    r = voice_rows(model.config)
    short = model.processor.collate([Example(model.processor.speech_prompt("Hi."), [batch["encoder_features"][0, : r + 1]])])
    assert short["encoder_lengths"].tolist() == [r + 1]
    model.prepare_inputs(short["input_ids"], short["attention_mask"], short["encoder_features"], short["encoder_lengths"])
    embeds, _ = model.prepare_inputs(batch["input_ids"], batch["attention_mask"], batch["encoder_features"],
                                     batch["encoder_lengths"])
    first_slot = int((batch["input_ids"][0] == SPEECH_TOKEN_ID).nonzero()[0])
    # untrained, the channel's vectors sit at the scale of the LLM's token embeddings (its gain's start)
    emb_std = model.language_model.get_input_embeddings().weight.float().std()
    torch.testing.assert_close(embeds[0, first_slot : first_slot + 3].float().std(), emb_std, rtol=0.3, atol=0)
    model.train()
    loss = model(**batch).loss
    loss.backward()
    assert model.voice_channel.norm.weight.grad.abs().sum() > 0
    trainable = {id(p) for p in model.trainable_parameters()}
    assert all(id(p) in trainable for p in model.voice_channel.parameters())
    with torch.no_grad():
        model.voice_channel.norm.weight.fill_(0.5)
    model.eval()
    moved, _ = model.prepare_inputs(batch["input_ids"], batch["attention_mask"], batch["encoder_features"],
                                    batch["encoder_lengths"])
    assert (moved[0, first_slot : first_slot + 3] - embeds[0, first_slot : first_slot + 3]).abs().max() > 0
    torch.testing.assert_close(moved[:, first_slot + 3 :], embeds[:, first_slot + 3 :])  # the words: untouched
    model.save_pretrained(tmp_path / "ckpt")
    loaded = BlspModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.voice_vectors == 3 and loaded.config.voice_layers == [1]
    torch.testing.assert_close(loaded(**batch).loss, model(**batch).loss)


def test_voice_rows_missing_from_cached_features_are_an_error_not_a_silent_shift():
    with pytest.raises(BlspError, match="voice statistics"):
        split_voice_rows(torch.zeros(2, 3, 4), torch.tensor([3, 2]), 4)


def test_voice_settings_are_checked(tiny_dirs):
    from blsp.config import BlspConfig

    model = BlspModel.from_components(tiny_dirs["encoder"], tiny_dirs["llm"], seed=0, voice_vectors=2)
    assert model.config.voice_layers == [1]  # conftest's Whisper has 2 encoder layers
    with pytest.raises(BlspError, match="above the encoder's first trained layer"):
        model.unfreeze_encoder_layers(2)
    with pytest.raises(BlspError, match="encoder has layers 1-2"):
        BlspConfig(encoder_config=model.config.encoder_config, llm_config=model.config.llm_config,
                   voice_vectors=2, voice_layers=[3])
    with pytest.raises(BlspError, match="0 \\(no voice channel\\)"):
        BlspConfig(encoder_config=model.config.encoder_config, llm_config=model.config.llm_config, voice_vectors=-1)


def test_a_clip_split_into_pieces_keeps_one_set_of_voice_rows(tiny_dirs):
    from blsp.features import join_pieces

    a = torch.cat([torch.full((2, 1), 1.0), torch.zeros(6, 1)])  # 2 voice rows, 6 word rows
    b = torch.cat([torch.full((2, 1), 4.0), torch.ones(2, 1)])  # 2 voice rows, 2 word rows
    joined = join_pieces([a, b], 2)
    assert joined.shape == (10, 1)
    assert joined[:2, 0].tolist() == pytest.approx([1.75, 1.75])  # weighted 6:2
    assert joined[2:, 0].tolist() == [0.0] * 6 + [1.0] * 2


def test_voice_channel_output_shape():
    channel = VoiceChannel(d_in=8, n_layers=2, d_llm=5, n_vectors=4)
    rows = torch.rand(3, 2 * len(STATISTICS) + 1, 8)
    assert channel(rows).shape == (3, 4, 5)


# ----------------------------------------------------------------------------------------------
# Named attributes: a fitted classifier per attribute, its posterior mixing class-word vectors
# ----------------------------------------------------------------------------------------------
def separable_rows(n: int, seed: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Voice rows [n, 7, 8] whose first statistic's mean says the class (its sign), under noise."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.rand(n, 2 * len(STATISTICS) + 1, 8, generator=gen) + 0.5
    fast = torch.arange(n) % 2 == 0
    rows[:, 0, 0] = torch.where(fast, 1.0, -1.0) + 0.3 * torch.randn(n, generator=gen)
    return rows, ["fast" if f else "slow" for f in fast]


def test_voice_heads_fit_on_labels_and_generalise_to_new_clips():
    from blsp.voice_channel import fit_voice_heads

    channel = VoiceChannel(d_in=8, n_layers=2, d_llm=5, n_vectors=0, attributes=("rate", "gender"))
    rows, rate = separable_rows(200)
    gender = ["male"] * 100 + ["female"] * 90 + [None] * 10  # a clip whose gender is not known is left out
    log = fit_voice_heads(channel, rows, {"rate": rate, "gender": gender})
    assert log["rate"]["classes"] == {"slow": 100, "normal": 0, "fast": 100}
    assert log["rate"]["train_accuracy"] == 1.0 and log["gender"]["clips"] == 190
    assert bool(channel.fitted)
    test_rows, test_rate = separable_rows(40, seed=1)
    post = channel.posteriors(test_rows)
    assert post["rate"].shape == (40, 3) and post["gender"].shape == (40, 2)
    labels = ("slow", "normal", "fast")
    said = [labels[k] for k in post["rate"].argmax(-1).tolist()]
    assert sum(a == b for a, b in zip(said, test_rate)) >= 38  # 95% of unseen clips: it reads the signal
    # the attribute's vector is its posterior's mix of the class vectors
    with torch.no_grad():
        channel.class_vectors["rate"].copy_(torch.eye(3, 5))
    out = channel(test_rows)
    assert out.shape == (40, 2, 5)
    torch.testing.assert_close(out[:, 0, :3], post["rate"])
    with pytest.raises(BlspError, match="voice attribute gender.*two classes"):
        fit_voice_heads(channel, rows, {"rate": rate, "gender": ["male"] * 200})


@pytest.fixture
def named_voice_model(tiny_whisper_dir, tiny_dirs):
    return BlspModel.from_components(tiny_whisper_dir, tiny_dirs["llm"], adapter_type="stack", adapter_downsample=1,
                                     speech_states="decoder", seed=0, voice_vectors=2,
                                     voice_attributes=("gender", "whispered"))


def test_named_attributes_read_first_start_at_the_class_words_and_round_trip(named_voice_model, tmp_path):
    from blsp.voice_channel import fit_voice_heads

    model = named_voice_model
    channel = model.voice_channel
    assert model.config.voice_attributes == ["gender", "whispered"]
    emb = model.language_model.get_input_embeddings().weight
    tok = model.processor.tokenizer
    female = tok(" female", add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(channel.class_vectors["gender"][1], emb[female].float().mean(0))
    # heads are fitted, not trained: the optimizer never sees them; the class vectors train
    trainable = {id(p) for p in model.trainable_parameters()}
    assert not any(id(p) in trainable for p in channel.heads.parameters())
    assert all(id(p) in trainable for p in channel.class_vectors.parameters())
    batch, _, _ = continuation_batch(model, [0.7, 1.2, 0.9, 1.5])
    n = voice_rows(model.config)
    rows = batch["encoder_features"][:, :n]
    fit_voice_heads(channel, rows, {"gender": ["male", "female", "male", "female"],
                                    "whispered": ["no", "yes", "no", "no"]})
    assert model.processor.speech_lengths(int(batch["encoder_lengths"][0])) == \
        2 + 2 + int(batch["encoder_lengths"][0]) - n  # two named, two free, then the words
    heard = model.heard_voice(batch["encoder_features"], batch["encoder_lengths"])
    assert max(heard[1]["gender"], key=heard[1]["gender"].get) == "female"
    assert sum(heard[0]["whispered"].values()) == pytest.approx(1.0)
    loss = model(**batch).loss
    model.save_pretrained(tmp_path / "ckpt")
    loaded = BlspModel.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.voice_attributes == ["gender", "whispered"] and bool(loaded.voice_channel.fitted)
    torch.testing.assert_close(loaded(**batch).loss, loss)
    assert loaded.heard_voice(batch["encoder_features"], batch["encoder_lengths"]) == heard


def test_voice_attribute_names_are_checked(tiny_dirs):
    from blsp.config import BlspConfig
    from blsp.options import voice_attribute_names

    assert voice_attribute_names("all") == ("gender", "rate", "pitch", "whispered", "noisy")
    assert voice_attribute_names("rate, noisy") == ("rate", "noisy")
    with pytest.raises(BlspError, match="unknown accent"):
        voice_attribute_names("gender,accent")
    model = BlspModel.from_components(tiny_dirs["encoder"], tiny_dirs["llm"], seed=0, voice_attributes=("rate",))
    assert model.config.voice_layers == [1] and model.config.feature_key.endswith("-voice1")
    with pytest.raises(BlspError, match="each at most once"):
        BlspConfig(encoder_config=model.config.encoder_config, llm_config=model.config.llm_config,
                   voice_attributes=["rate", "rate"])


def test_the_voice_channel_reads_beside_the_transcript_bridge(tiny_whisper_dir, tiny_dirs):
    """The decoder preset reads Whisper's transcript as the LLM's tokens; the voice recipe adds the
    voice channel to it: the voice vectors come first, then the transcript's tokens, and a clip's
    loss does not depend on its batch."""
    from conftest import assert_loss_batch_invariant

    model = BlspModel.from_components(tiny_whisper_dir, tiny_dirs["llm"], adapter_type="stack", adapter_downsample=1,
                                      speech_states="decoder", speech_vectors="tokens", bridge_transcript=True,
                                      seed=0, voice_vectors=2).eval()
    mel, lengths = mels([0.5, 2.2])
    feats, n = model.encode_mel(mel, lengths)
    assert torch.isfinite(assert_loss_batch_invariant(model, [feats[k, : n[k]] for k in range(2)]))


def test_voice_positions_are_the_first_slots_of_every_run_of_speech():
    from blsp.lora import voice_positions

    speech = torch.tensor([[0, 1, 1, 1, 1, 0, 0, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    assert voice_positions(speech, 2).int().tolist() == [[0, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0],
                                                         [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]]
    assert not voice_positions(speech, 0).any()


def _voiced(tiny_whisper_dir, tiny_dirs, place):
    return BlspModel.from_components(tiny_whisper_dir, tiny_dirs["llm"], adapter_type="stack", adapter_downsample=1,
                                     speech_states="decoder", seed=0, voice_vectors=3, voice_place=place)


def test_voice_vectors_after_the_words_follow_each_clips_own_words(tiny_whisper_dir, tiny_dirs, tmp_path):
    """`voice_place="after"`: the same vectors as "before", the words first, each clip's voice right
    after its own words (clips of different lengths: not at the padded end); the choice round-trips
    and an unknown place is refused."""
    before, after = (_voiced(tiny_whisper_dir, tiny_dirs, place) for place in ("before", "after"))
    batch, _, _ = continuation_batch(after, [0.7, 1.2])
    args = (batch["input_ids"], batch["attention_mask"], batch["encoder_features"], batch["encoder_lengths"])
    with torch.no_grad():
        a, b = after.prepare_inputs(*args)[0], before.prepare_inputs(*args)[0]
    speech = batch["input_ids"] == SPEECH_TOKEN_ID
    for row in range(2):
        slots = speech[row].nonzero()[:, 0]
        words = len(slots) - 3
        torch.testing.assert_close(a[row, slots[:words]], b[row, slots[3:]])  # the words, first
        torch.testing.assert_close(a[row, slots[words:]], b[row, slots[:3]])  # then the voice
    assert speech[0].sum() != speech[1].sum()
    after.save_pretrained(tmp_path / "after")
    assert BlspModel.from_pretrained(tmp_path / "after").config.voice_place == "after"
    with pytest.raises(BlspError, match="voice place"):
        _voiced(tiny_whisper_dir, tiny_dirs, "middle")


@pytest.mark.parametrize("place", ["before", "after"])
def test_voice_lora_acts_at_the_voice_vectors_alone_and_round_trips(tiny_whisper_dir, tiny_dirs, tiny_model, tmp_path,
                                                                    place):
    """`--lora-where voice`: LoRA's branch runs at each clip's voice vectors only, so the prompt before
    them is the frozen LLM's; what follows reads them (the answer changes)."""
    from blsp.lora import LoraSettings
    from test_lora import _randomise_lora

    with pytest.raises(BlspError, match="--lora-where voice"):
        tiny_model.enable_lora(LoraSettings(rank=4, where="voice"))  # no voice channel
    model = _voiced(tiny_whisper_dir, tiny_dirs, place)
    model.enable_lora(LoraSettings(rank=4, where="voice"))
    _randomise_lora(model)
    model.eval()
    batch, _, _ = continuation_batch(model, [0.7, 1.2])
    masks = []
    positions = model.lora_gate.positions
    model.lora_gate.positions = lambda mask: (masks.append(mask.clone()), positions(mask))[1]
    with torch.no_grad():
        logits = model(**batch, return_logits=True).logits
        with model.lora_off():
            frozen = model(**batch, return_logits=True).logits
    speech = batch["input_ids"] == SPEECH_TOKEN_ID
    for mask in masks:
        assert mask.sum(dim=1).tolist() == [3, 3]  # the three voice vectors of each clip
        for row in range(2):
            slots = speech[row].nonzero()[:, 0]
            assert mask[row, slots[:3] if place == "before" else slots[-3:]].all()
    for row in range(2):  # up to the first voice vector, the frozen LLM's
        first = int(masks[0][row].nonzero()[0])
        torch.testing.assert_close(logits[row, :first], frozen[row, :first], rtol=0, atol=0)
    assert (logits[:, -1] - frozen[:, -1]).abs().max() > 1e-4
    model.save_pretrained(tmp_path / "ckpt")
    loaded = BlspModel.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config.lora["where"] == "voice"
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch, return_logits=True).logits, logits)
