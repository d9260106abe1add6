"""Step 2: the loss goes down, frozen parts stay frozen, resume equals an uninterrupted run."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from blsp.behavior import BehaviorItem, build_items, read_behavior_data
from blsp.options import TrainOptions
from blsp.sampling import global_batch_indices, micro_batches, padding_waste
from blsp.trainer import Trainer
from blsp.training import run_train
from blsp.distributed import DistInfo

from conftest import write_corpus


def options(tiny_dirs, tmp_path, **kw):
    # fp32: these tests compare runs to fp tolerance; on a GPU `auto` would mean bf16 autocast.
    base = dict(encoder=tiny_dirs["encoder"], llm=tiny_dirs["llm"], batch_size=2, lr=5e-3, warmup_steps=2,
                max_steps=6, save_every=2, feature_cache=str(tmp_path / "features"), precision="fp32")
    base.update(kw)
    return TrainOptions.from_flat(**base)


def adapter_of(path):
    return load_file(str(path / "adapter.safetensors"))


def test_global_batches_cover_each_epoch_once_and_split_across_ranks():
    n, g = 10, 4
    seen = [i for step in range(5) for i in global_batch_indices(step, n, g, seed=3)]
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    idx = global_batch_indices(0, n, g, seed=3)
    r0 = micro_batches(idx, 1, DistInfo(0, 2, 0))
    r1 = micro_batches(idx, 1, DistInfo(1, 2, 0))
    assert sorted(sum(r0 + r1, [])) == sorted(idx)


@pytest.mark.parametrize("n", [96, 103, 5])  # a multiple of the global batch, not one, and less than one
def test_length_buckets_are_deterministic_cover_each_epoch_once_and_cut_padding(n):
    g, micro = 8, 4
    gen = torch.Generator().manual_seed(1)
    lengths = tuple(int(x) for x in (torch.randn(n, generator=gen) * 0.8).exp().mul(60).long() + 10)  # skewed
    steps = 3 * n // g + 2
    bucketed = [global_batch_indices(s, n, g, seed=3, lengths=lengths) for s in range(steps)]
    assert bucketed == [global_batch_indices(s, n, g, seed=3, lengths=lengths) for s in range(steps)]
    flat = [i for b in bucketed for i in b]
    for epoch in range(3):  # every item exactly once per epoch, epochs in different orders
        assert sorted(flat[epoch * n : (epoch + 1) * n]) == list(range(n))
    if n < g:
        return
    assert flat[:n] != flat[n : 2 * n]
    plain = [global_batch_indices(s, n, g, seed=3) for s in range(steps)]
    waste = {name: padding_waste([mb for b in batches for mb in micro_batches(b, micro, DistInfo())], lengths)
             for name, batches in (("plain", plain), ("bucketed", bucketed))}
    assert waste["plain"] > 0.3 and waste["bucketed"] < waste["plain"] / 3, waste


def test_bucketing_by_speech_frames_too_cuts_their_padding_and_keeps_the_llms_low():
    """Sequences whose length is mostly the continuation's: speech frames vary independently."""
    n, g = 960, 8
    gen = torch.Generator().manual_seed(4)
    frames = tuple(int(f) for f in torch.randint(100, 300, (n,), generator=gen))
    lengths = tuple(60 + f // 8 + int(t) for f, t in zip(frames, torch.randint(5, 60, (n,), generator=gen)))
    steps = n // g
    by_length = [global_batch_indices(s, n, g, seed=0, lengths=lengths) for s in range(steps)]
    by_both = [global_batch_indices(s, n, g, seed=0, lengths=lengths, frames=frames) for s in range(steps)]
    assert sorted(i for b in by_both for i in b) == list(range(n))  # still each item once an epoch
    assert padding_waste(by_both, frames) < 0.10 < padding_waste(by_length, frames)
    assert padding_waste(by_both, lengths) < 0.05


def test_gradient_checkpointing_trains_the_same_adapter(tiny_dirs, tmp_path):
    data = write_corpus(tmp_path / "data", n=4, with_continuation=True)
    run_train([data], tmp_path / "plain", options(tiny_dirs, tmp_path, max_steps=2))
    run_train([data], tmp_path / "ckpt", options(tiny_dirs, tmp_path, max_steps=2, gradient_checkpointing=True))
    a, b = adapter_of(tmp_path / "plain"), adapter_of(tmp_path / "ckpt")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)


def test_training_lowers_the_loss_and_logs_each_step(tiny_dirs, tmp_path):
    data = write_corpus(tmp_path / "data", n=4, with_continuation=True)
    out = tmp_path / "run"
    run_train([data], out, options(tiny_dirs, tmp_path, max_steps=30, lr=1e-2, batch_size=4))
    log = [json.loads(l) for l in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 31))
    first, last = log[0]["loss"], sum(r["loss"] for r in log[-3:]) / 3
    assert last < 0.7 * first, (first, last)
    assert (out / "train_loss.png").stat().st_size > 1000
    assert (out / "adapter.safetensors").exists() and (out / "config.json").exists()
    # features were cached once, one file per clip
    assert len(list((tmp_path / "features").rglob("*.npy"))) == 4


COMPRESSING = dict(warm_start="embed", warm_start_steps=4, warm_start_batch_size=4, compress_speech="ctc")


# On a GPU, flash attention's backward (and CTC's) sum in a nondeterministic order and Adam turns
# that noise into different updates: resuming is exact on a CPU (CI), within noise on a GPU.
@pytest.mark.xfail(torch.cuda.is_available(), reason="CUDA attention backward is nondeterministic", strict=False)
@pytest.mark.parametrize("levers", [{}, COMPRESSING], ids=["plain", "embed+ctc-compression"])
def test_resume_after_a_kill_ends_with_the_same_adapter(tiny_dirs, tmp_path, monkeypatch, levers):
    data = write_corpus(tmp_path / "data", n=5, with_continuation=True, seconds=3.0 if levers else 0.6)
    opts = options(tiny_dirs, tmp_path, **levers)
    run_train([data], tmp_path / "full", opts)

    real_step = Trainer.train_step

    def dying_step(self, step):
        if step == 3:  # after the step-2 checkpoint and one more step
            raise KeyboardInterrupt
        return real_step(self, step)

    monkeypatch.setattr(Trainer, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        run_train([data], tmp_path / "killed", opts)
    monkeypatch.setattr(Trainer, "train_step", real_step)
    run_train([data], tmp_path / "killed", opts, resume=True)

    full, resumed = adapter_of(tmp_path / "full"), adapter_of(tmp_path / "killed")
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=1e-5, atol=1e-6, msg=k)
    log = [json.loads(l)["step"] for l in (tmp_path / "killed" / "train_log.jsonl").read_text().splitlines()]
    assert log == list(range(1, 7))


def test_resume_with_other_settings_is_refused(tiny_dirs, tmp_path):
    from blsp.errors import CheckpointError

    data = write_corpus(tmp_path / "data", n=3, with_continuation=True)
    run_train([data], tmp_path / "run", options(tiny_dirs, tmp_path, max_steps=2))
    with pytest.raises(CheckpointError, match="lr"):
        run_train([data], tmp_path / "run", options(tiny_dirs, tmp_path, max_steps=2, lr=1.0), resume=True)


def test_grad_accumulation_equals_a_bigger_batch(tiny_dirs, tmp_path):
    data = write_corpus(tmp_path / "data", n=4, with_continuation=True)
    run_train([data], tmp_path / "big", options(tiny_dirs, tmp_path, batch_size=4, max_steps=3))
    run_train([data], tmp_path / "acc", options(tiny_dirs, tmp_path, batch_size=1, grad_accum=4, max_steps=3))
    a, b = adapter_of(tmp_path / "big"), adapter_of(tmp_path / "acc")
    for k in a:
        # Adam turns fp-noise in near-zero gradients into updates of up to lr: compare at 1/25 of lr.
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=2e-4, msg=k)


def test_frozen_parts_are_checked(tiny_model, tiny_dirs, tmp_path):
    data = write_corpus(tmp_path / "data", n=2, with_continuation=True)
    utts, _ = read_behavior_data([data])
    trainer = Trainer(tiny_model, utts, options(tiny_dirs, tmp_path), tmp_path / "run")
    before = trainer.frozen_digests()
    with torch.no_grad():
        tiny_model.language_model.lm_head.weight[0, 0] += 1e-3
    with pytest.raises(RuntimeError, match="frozen language_model changed"):
        trainer.check_frozen(before)


def test_behavior_data_without_continuation_names_the_line(tmp_path):
    from blsp.errors import InputError

    data = write_corpus(tmp_path / "data", n=2)
    with pytest.raises(InputError) as err:
        read_behavior_data([data])
    assert str(err.value).startswith(f"{data}:1:")


def test_audio_unreadable_only_at_training_names_its_line_or_is_skipped(tiny_dirs, tmp_path):
    import numpy as np
    import soundfile as sf

    from blsp.errors import InputError

    data = write_corpus(tmp_path / "data", n=3, with_continuation=True)
    bad = np.full(8000, np.nan, dtype=np.float32)  # the header reads; the samples do not
    sf.write(tmp_path / "data" / "wav" / "u1.wav", bad, 16000, subtype="FLOAT")
    with pytest.raises(InputError) as err:
        run_train([data], tmp_path / "run", options(tiny_dirs, tmp_path, max_steps=1))
    assert str(err.value).startswith(f"{data}:2:")
    result = run_train([data], tmp_path / "run2", options(tiny_dirs, tmp_path, max_steps=1), skip_bad=True)
    assert len(result["skipped_bad"]) == 1 and result["skipped_bad"][0].startswith(f"{data}:2:")
    summary = json.loads((tmp_path / "run2" / "train_summary.json").read_text())
    assert summary["examples"] == 2


def test_ctc_warm_start_lowers_its_loss_and_then_trains(tiny_dirs, tmp_path):
    data = write_corpus(tmp_path / "data", n=4, with_continuation=True, seconds=4.0)
    opts = options(tiny_dirs, tmp_path, max_steps=2, warm_start="ctc", warm_start_steps=40,
                   warm_start_batch_size=4, warm_start_lr=1e-2)
    run_train([data], tmp_path / "run", opts)
    log = json.loads((tmp_path / "run" / "warm_start_log.json").read_text())
    assert len(log) == 40
    assert sum(r["ctc_loss"] for r in log[-5:]) / 5 < 0.8 * log[0]["ctc_loss"], (log[0], log[-1])
    assert (tmp_path / "run" / "adapter.safetensors").exists()


@pytest.mark.parametrize("bucketed", [True, False])
def test_the_warm_start_batches_clips_of_similar_length_unless_told_not_to(tiny_dirs, tmp_path, monkeypatch, bucketed):
    import blsp.warmstart

    data = write_corpus(tmp_path / "data", n=6, with_continuation=True, seconds=1.0)
    seen = []
    real = blsp.warmstart.global_batch_indices

    def spy(step, n, batch, seed, lengths=None, frames=None):
        seen.append(lengths)
        return real(step, n, batch, seed, lengths, frames)

    monkeypatch.setattr(blsp.warmstart, "global_batch_indices", spy)
    opts = options(tiny_dirs, tmp_path, max_steps=1, warm_start="ctc", warm_start_steps=3, warm_start_batch_size=2,
                   bucket_by_length=bucketed)
    run_train([data], tmp_path / "run", opts)
    warm = seen[:3]  # the warm start's three steps come first
    if bucketed:  # the clips' encoder frames (0.37 s apart: 18 or 19 frames)
        frames = warm[0]
        assert len(frames) == 6 and all(17 <= b - a <= 20 for a, b in zip(frames, frames[1:])), frames
    else:
        assert warm == [None] * 3


def test_embed_warm_start_and_compression_train_and_save_the_ctc_head(tiny_dirs, tmp_path):
    from blsp.modeling import BlspModel

    data = write_corpus(tmp_path / "data", n=4, with_continuation=True, seconds=4.0)
    opts = options(tiny_dirs, tmp_path, max_steps=2, warm_start="embed", warm_start_steps=30,
                   warm_start_batch_size=4, warm_start_lr=1e-2, compress_speech="ctc")
    run_train([data], tmp_path / "run", opts)
    log = json.loads((tmp_path / "run" / "warm_start_log.json").read_text())
    assert sum(r["embed_loss"] for r in log[-5:]) / 5 < 0.8 * log[0]["embed_loss"], (log[0], log[-1])
    steps = [json.loads(l) for l in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert all(r["ctc"] > 0 for r in steps)  # the head keeps learning beside step 2's loss
    model = BlspModel.from_pretrained(tmp_path / "run")
    assert model.config.speech_compression == "ctc" and model.ctc_head is not None
    assert any(k.startswith("ctc_head.") for k in adapter_of(tmp_path / "run"))


def test_warm_start_data_joins_the_warm_start_and_the_ctc_vocabulary(tiny_dirs, tmp_path, tiny_model):
    from blsp.modeling import BlspModel
    from blsp.warmstart import transcript_tokens
    from blsp.data import read_manifest

    behavior = write_corpus(tmp_path / "behavior", n=2, with_continuation=True, seconds=3.0)
    extra = write_corpus(tmp_path / "extra", n=5, seconds=3.0)  # transcripts only: no step 1
    opts = options(tiny_dirs, tmp_path, max_steps=1, warm_start="ctc", warm_start_steps=2, warm_start_batch_size=4,
                   compress_speech="ctc", warm_start_data=[str(extra)])
    run_train([behavior], tmp_path / "run", opts)
    vocab = set(BlspModel.from_pretrained(tmp_path / "run").config.ctc_vocab)
    extra_tokens = {t for u in read_manifest(extra).utterances for t in transcript_tokens(tiny_model.processor.tokenizer, u)}
    assert extra_tokens <= vocab
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["examples"] == 2 and summary["options"]["warm_start_data"] == [str(extra)]
    assert 0 < summary["peak_rss_before_training_mb"] <= summary["peak_rss_mb"]
    assert summary["warm_start_clips"] == 2 + 5


def test_ctc_min_count_trains_a_smaller_head_on_spelled_transcripts(tiny_dirs, tmp_path, tiny_model):
    from blsp.data import read_manifest
    from blsp.modeling import BlspModel
    from blsp.vocabulary import Speller, single_byte_tokens
    from blsp.warmstart import transcript_tokens

    # Spelled transcripts are longer (this tiny tokenizer spells most words letter by letter): 8 s
    # clips give CTC the frames it needs for them.
    data = write_corpus(tmp_path / "data", n=4, with_continuation=True, seconds=8.0)
    opts = options(tiny_dirs, tmp_path, max_steps=2, warm_start="ctc", warm_start_steps=2, warm_start_batch_size=4,
                   compress_speech="ctc", ctc_min_count=3)
    run_train([data], tmp_path / "run", opts)
    model = BlspModel.from_pretrained(tmp_path / "run")
    vocab = set(model.config.ctc_vocab)
    tok = tiny_model.processor.tokenizer
    seen = [transcript_tokens(tok, u) for u in read_manifest(data).utterances]
    assert set(single_byte_tokens(tok)) <= vocab and not {t for s in seen for t in s} <= vocab
    speller = Speller(tok, vocab)
    assert all(set(speller(s)) <= vocab and tok.decode(speller(s)) == tok.decode(s) for s in seen)
    steps = [json.loads(l) for l in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert all(r["ctc"] > 0 for r in steps)


def test_a_clip_in_both_the_behavior_data_and_the_warm_start_data_is_heard_once(tiny_dirs, tmp_path):
    # The demo continues the first part of its train manifest and hands the warm start the whole
    # manifest: the continued clips must not count twice in the warm start's batches.
    corpus = write_corpus(tmp_path / "data", n=5, seconds=3.0)
    continued = [dict(json.loads(line), continuation="and so on.", truncated=False)
                 for line in corpus.read_text().splitlines()[:2]]
    behavior = corpus.parent / "behavior.jsonl"  # beside the manifest: same relative audio paths
    behavior.write_text("".join(json.dumps(r) + "\n" for r in continued))
    opts = options(tiny_dirs, tmp_path, max_steps=1, warm_start="ctc", warm_start_steps=1, warm_start_batch_size=4,
                   compress_speech="ctc", warm_start_data=[str(corpus)])
    run_train([behavior], tmp_path / "run", opts)
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert summary["examples"] == 2 and summary["warm_start_clips"] == 5


def test_compression_without_a_warm_start_is_refused_before_training(tiny_dirs, tmp_path):
    from blsp.errors import BlspError

    data = write_corpus(tmp_path / "data", n=2, with_continuation=True)
    with pytest.raises(BlspError, match="--warm-start"):
        run_train([data], tmp_path / "run", options(tiny_dirs, tmp_path, compress_speech="ctc"))


def test_warm_start_data_without_a_warm_start_is_refused_before_any_clip_is_encoded(tmp_path):
    from blsp.errors import BlspError
    from blsp.options import TrainOptions

    with pytest.raises(BlspError, match="--warm-start-data is heard by the warm start only"):
        TrainOptions.from_flat(warm_start_data=[str(tmp_path / "more.jsonl")])
    with pytest.raises(BlspError, match="--warm-start-data"):
        TrainOptions.from_preset("fast", warm_start_steps=0, compress_speech="none", warm_start_data=["more.jsonl"])


def test_drop_copies_leaves_out_continuations_that_repeat_the_transcript(tiny_dirs, tmp_path, tiny_model):
    from blsp.behavior import build_items

    data = write_corpus(tmp_path / "data", n=4, with_continuation=True)
    utts, _ = read_behavior_data([data])
    utts[1].extra["continuation"] = utts[1].text.upper() + "!"  # a copy, up to case and punctuation
    items = build_items(tiny_model.processor, utts, options(tiny_dirs, tmp_path, drop_copies=True))
    assert [it.utterance.id for it in items] == ["u0", "u2", "u3"]


def test_max_target_tokens_keeps_each_continuations_first_tokens(tiny_dirs, tmp_path, tiny_model):
    from blsp.errors import BlspError
    from blsp.behavior import build_items

    data = write_corpus(tmp_path / "data", n=3, with_continuation=True)
    utts, _ = read_behavior_data([data])
    proc = tiny_model.processor
    full = build_items(proc, utts, options(tiny_dirs, tmp_path))
    capped = build_items(proc, utts, options(tiny_dirs, tmp_path, max_target_tokens=3))
    for f, c in zip(full, capped):
        assert len(f.target) > 3 and c.target == f.target[:3] and c.prompt == f.prompt
    with pytest.raises(BlspError, match="--max-target-tokens 0"):
        options(tiny_dirs, tmp_path, max_target_tokens=0)


def test_kl_loss_logs_kl_and_mixed_transcription_changes_prompts_and_targets(tiny_dirs, tmp_path, tiny_model):
    from blsp.behavior import build_items

    data = write_corpus(tmp_path / "data", n=4, with_continuation=True)
    run_train([data], tmp_path / "run", options(tiny_dirs, tmp_path, max_steps=2, loss="ce+kl"))
    log = [json.loads(l) for l in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert all(r["kl"] > 0 for r in log)
    utts, _ = read_behavior_data([data])
    proc = tiny_model.processor
    plain = build_items(proc, utts, options(tiny_dirs, tmp_path))
    mixed = build_items(proc, utts, options(tiny_dirs, tmp_path, mix_transcribe=1.0))
    for p, m, u in zip(plain, mixed, utts):
        assert p.target == proc.prompt.target_ids(u.extra["continuation"])
        assert m.target == proc.prompt.target_ids(u.text) and m.prompt != p.prompt


def test_mix_trains_shares_on_step_1s_other_answers_and_names_a_line_without_one(tiny_dirs, tmp_path, tiny_model):
    from blsp.errors import BlspError, InputError
    from blsp.behavior import build_items
    from blsp.options import choose_task, mix_shares

    assert mix_shares(options(tiny_dirs, tmp_path, mix="summarize=0.2, transcribe=0.1")) == \
        {"summarize": 0.2, "transcribe": 0.1}
    assert mix_shares(options(tiny_dirs, tmp_path, mix_transcribe=0.1)) == {"transcribe": 0.1}
    shares = {"summarize": 0.2, "transcribe": 0.1}  # laid end to end: [0, .2) [.2, .3), the rest continues
    assert [choose_task(d, shares) for d in (0.0, 0.19, 0.2, 0.29, 0.31, 0.99)] == \
        ["summarize", "summarize", "transcribe", "transcribe", None, None]
    for bad in ("summarize", "summarize=2", "a=0.6,b=0.6", "a=0.1,a=0.2"):
        with pytest.raises(BlspError, match="--mix"):
            options(tiny_dirs, tmp_path, mix=bad)

    data = write_corpus(tmp_path / "data", n=3, with_continuation=True)
    records = [json.loads(l) for l in data.read_text().splitlines()]
    for i, rec in enumerate(records):
        rec["responses"] = {"summarize": {"instruction": "Summarize the text.", "text": f"summary {i}",
                                          "truncated": i == 2}}
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    utts, _ = read_behavior_data([data])
    proc = tiny_model.processor
    items = build_items(proc, utts, options(tiny_dirs, tmp_path, mix="summarize=1"))
    for i, (item, u) in enumerate(zip(items, utts)):
        assert item.target == proc.prompt.target_ids(f"summary {i}", i == 2)  # truncated: no end-of-turn
        assert item.prompt == proc.speech_prompt("Summarize the text.")
        assert item.teacher_prompt == proc.transcript_prompt("Summarize the text.", u.text)

    del records[1]["responses"]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    utts, _ = read_behavior_data([data])
    with pytest.raises(InputError, match="no step-1 answer for task 'summarize'") as err:
        build_items(proc, utts, options(tiny_dirs, tmp_path, mix="summarize=1"))
    assert f"{data}:2:" in str(err.value)


def test_mix_other_distils_the_continuation_under_other_instructions_and_checks_its_file(tiny_dirs, tmp_path,
                                                                                         tiny_model):
    """`--mix other=1`: every item keeps its continuation's tokens, under an instruction drawn from
    --other-instructions, its teacher the transcript under the same instruction, distilled (no
    saved top-k: that was the continuation instruction's); a missing or malformed file is refused
    before training, naming it."""
    from blsp.behavior import build_items
    from blsp.errors import BlspError, InputError

    data = write_corpus(tmp_path / "data", n=6, with_continuation=True)
    instructions = tmp_path / "other.yaml"
    instructions.write_text("a: Say it in French.\nb: Give it a title.\n")
    utts, _ = read_behavior_data([data])
    proc = tiny_model.processor
    opts = options(tiny_dirs, tmp_path, mix="other=1", other_instructions=str(instructions), loss="kl")
    items = build_items(proc, utts, opts)
    used = set()
    for item, u in zip(items, utts):
        instruction = next(i for i in ("Say it in French.", "Give it a title.") if item.prompt == proc.speech_prompt(i))
        used.add(instruction)
        assert item.target == proc.prompt.target_ids(u.extra["continuation"])
        assert item.teacher_prompt == proc.transcript_prompt(instruction, u.text)
        assert not item.exact and item.teacher_topk is None
    assert used == {"Say it in French.", "Give it a title."}  # drawn, not one for all
    assert build_items(proc, utts, opts)[0].prompt == items[0].prompt  # seeded
    with pytest.raises(BlspError, match="--other-instructions FILE"):
        run_train([data], tmp_path / "run", options(tiny_dirs, tmp_path, mix="other=0.5"))
    instructions.write_text("- just a list\n")
    with pytest.raises(InputError, match="an instruction set is a mapping") as err:  # step 1's reader, file and line
        run_train([data], tmp_path / "run", options(tiny_dirs, tmp_path, mix="other=0.5",
                                                    other_instructions=str(instructions)))
    assert f"{instructions}:1:" in str(err.value)


def test_mix_voice_trains_a_lines_answers_about_its_voice_read_beside_its_description(tiny_dirs, tmp_path,
                                                                                      tiny_model):
    from blsp.behavior import build_items, check_behavior_data
    from blsp.errors import BlspError

    data = write_corpus(tmp_path / "data", n=4, with_continuation=True)
    records = [json.loads(l) for l in data.read_text().splitlines()]
    for i, rec in enumerate(records[:3]):  # the last line states no voice: drawn for voice, it continues
        rec["responses"] = {f"voice_{a}": {"instruction": f"{a}?", "text": f"{a} {i}", "truncated": False,
                                           "heard": f"The speaker is a woman. They say: \"{rec['text']}\""}
                            for a in ("gender", "rate")}
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    utts, _ = read_behavior_data([data])
    proc = tiny_model.processor
    opts = options(tiny_dirs, tmp_path, mix="voice=1")
    check_behavior_data(utts, opts)
    items = build_items(proc, utts, opts)
    for i, (item, u) in enumerate(zip(items[:3], utts)):
        task = next(a for a in ("gender", "rate") if item.target == proc.prompt.target_ids(f"{a} {i}"))
        assert item.prompt == proc.speech_prompt(f"{task}?")
        assert item.teacher_prompt == proc.transcript_prompt(f"{task}?", u.extra["responses"][f"voice_{task}"]["heard"])
        assert item.exact  # a fact about the voice: learnt by cross-entropy, as a transcript
    assert items[3].target == proc.prompt.target_ids(utts[3].extra["continuation"])
    assert [i.target for i in items] == [i.target for i in build_items(proc, utts, opts)]  # seeded
    for rec in records:
        rec.pop("responses", None)
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(BlspError, match="--voice-questions"):
        check_behavior_data(read_behavior_data([data])[0], opts)


def test_named_voice_attributes_are_fitted_on_the_lines_labels_before_training_and_kept(tiny_dirs, tmp_path):
    from blsp.modeling import BlspModel
    from blsp.errors import BlspError

    data = write_corpus(tmp_path / "data", n=6, with_continuation=True)
    records = [json.loads(l) for l in data.read_text().splitlines()]
    for i, rec in enumerate(records):  # the tones rise with i: the later half "high"
        rec["pitch"] = "high" if i >= 3 else "low"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    opts = options(tiny_dirs, tmp_path, voice_attributes="pitch", max_steps=2)
    run_train([data], tmp_path / "run", opts)
    log = json.loads((tmp_path / "run" / "voice_heads.json").read_text())
    assert log["pitch"]["classes"] == {"low": 3, "normal": 0, "high": 3} and log["pitch"]["train_accuracy"] == 1.0
    model = BlspModel.from_pretrained(tmp_path / "run")
    assert model.config.voice_attributes == ["pitch"] and bool(model.voice_channel.fitted)
    # trained on from the saved model, the heads stay as fitted (no second fit on other labels)
    heads = {k: v.clone() for k, v in model.voice_channel.heads.state_dict().items()}
    for rec in records:
        rec["pitch"] = "normal"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    run_train([data], tmp_path / "more", options(tiny_dirs, tmp_path, voice_attributes="pitch", max_steps=1,
                                                 init_from=str(tmp_path / "run")))
    again = BlspModel.from_pretrained(tmp_path / "more").voice_channel.heads.state_dict()
    assert all(torch.equal(heads[k], again[k]) for k in heads)
    with pytest.raises(BlspError, match="voice attribute pitch.*two classes"):
        run_train([data], tmp_path / "fresh", options(tiny_dirs, tmp_path, voice_attributes="pitch", max_steps=1))
    with pytest.raises(BlspError, match="--voice-attributes"):
        run_train([data], tmp_path / "x", options(tiny_dirs, tmp_path, max_steps=1, init_from=str(tmp_path / "run")))


def test_unfrozen_encoder_layers_train_are_saved_and_cache_features_below_them(tiny_dirs, tmp_path):
    from blsp.errors import BlspError
    from blsp.modeling import BlspModel

    data = write_corpus(tmp_path / "data", n=4, with_continuation=True)
    out = tmp_path / "run"
    run_train([data], out, options(tiny_dirs, tmp_path, max_steps=3, lr=1e-2, unfreeze_encoder_layers=1))
    weights = load_file(str(out / "adapter.safetensors"))
    trained = {k: v for k, v in weights.items() if k.startswith("audio_tower.")}
    assert trained and all(k.startswith(("audio_tower.layers.1.", "audio_tower.layer_norm.")) for k in trained)
    base = BlspModel.from_components(tiny_dirs["encoder"], tiny_dirs["llm"]).audio_tower.state_dict()
    assert any(not torch.equal(v, base[k[len("audio_tower."):]]) for k, v in trained.items())  # they moved
    cached = [p.name for p in (tmp_path / "features").iterdir()]
    assert len(cached) == 1 and cached[0].endswith("-below-layer1")
    with pytest.raises(BlspError, match="--fsdp"):
        options(tiny_dirs, tmp_path, unfreeze_encoder_layers=1, fsdp=True)


def test_encoder_lr_moves_the_unfrozen_layers_at_their_own_rate_in_both_stages(tiny_dirs, tmp_path):
    from blsp.errors import BlspError
    from blsp.modeling import BlspModel
    from blsp.trainer import parameter_groups

    base = BlspModel.from_components(tiny_dirs["encoder"], tiny_dirs["llm"]).audio_tower.state_dict()

    def encoder_change(run):
        weights = load_file(str(run / "adapter.safetensors"))
        return max(float((v - base[k[len("audio_tower."):]]).abs().max())
                   for k, v in weights.items() if k.startswith("audio_tower."))

    data = write_corpus(tmp_path / "data", n=4, with_continuation=True, seconds=4.0)  # long enough for CTC
    moved = {}
    for name, encoder_lr, stages in (("own", 1e-30, {}), ("shared", None, {}),
                                     ("own-ws", 1e-30, dict(warm_start="ctc", warm_start_steps=3, max_steps=1,
                                                            warm_start_batch_size=4, warm_start_lr=1e-2))):
        out = tmp_path / name
        run_train([data], out, options(tiny_dirs, tmp_path, **{"max_steps": 3, "lr": 1e-2, **stages},
                                       unfreeze_encoder_layers=1, encoder_lr=encoder_lr, lora_rank=2, lora_lr=2e-2))
        moved[name] = encoder_change(out)
    # At 1e-30 the layers keep their weights (in step 2 and in the warm start, which had gradients to
    # give them); at the adapter's rate they move.
    assert all(r["ctc_loss"] > 0 and r["grad_norm"] > 0
               for r in json.loads((tmp_path / "own-ws" / "warm_start_log.json").read_text()))
    assert moved["own"] < 1e-20 and moved["own-ws"] < 1e-20 and moved["shared"] > 1e-4

    from blsp.lora import LoraSettings

    model = BlspModel.from_components(tiny_dirs["encoder"], tiny_dirs["llm"])
    model.enable_lora(LoraSettings(rank=2))
    model.unfreeze_encoder_layers(1)
    groups = parameter_groups(model, options(tiny_dirs, tmp_path, unfreeze_encoder_layers=1, encoder_lr=1e-4,
                                             lora_rank=2, lora_lr=2e-3))
    assert [g.get("lr") for g in groups] == [None, 2e-3, 1e-4]  # the rest at --lr, LoRA, the encoder
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.trainable_parameters())  # each once
    with pytest.raises(BlspError, match="--encoder-lr 0.0001: needs --unfreeze-encoder-layers"):
        options(tiny_dirs, tmp_path, encoder_lr=1e-4)


def test_kl_from_step_1s_saved_top_k_equals_running_the_teacher(tiny_dirs, tmp_path, tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from blsp.continuation import ContinueOptions, run_continue
    from blsp.errors import InputError

    llm = AutoModelForCausalLM.from_pretrained(tiny_dirs["llm"]).eval(), AutoTokenizer.from_pretrained(tiny_dirs["llm"])
    vocab = llm[0].config.vocab_size  # K = the whole vocabulary: the saved teacher is the teacher, to rounding
    data = write_corpus(tmp_path / "data", n=3)
    behavior = tmp_path / "b.jsonl"
    run_continue(data, behavior, ContinueOptions(max_new_tokens=5, save_topk=vocab), model_and_tokenizer=llm)
    utts, _ = read_behavior_data([behavior])
    opts = options(tiny_dirs, tmp_path, loss="kl", max_target_tokens=4)
    trainer = Trainer(tiny_model, utts, opts, tmp_path / "run")
    assert all(it.teacher_topk is not None and it.teacher_topk[0].shape[0] == len(it.target) for it in trainer.items)
    batch = tiny_model.processor.collate([trainer.example(it) for it in trainer.items])
    with torch.no_grad():
        student = tiny_model(**batch, return_target_logits=True).target_logits
    saved = trainer.distillation(trainer.items, student)
    fresh = [BehaviorItem(it.utterance, it.prompt, it.teacher_prompt, it.target) for it in trainer.items]
    torch.testing.assert_close(saved, trainer.distillation(fresh, student), atol=1e-3, rtol=1e-3)

    records = [json.loads(l) for l in behavior.read_text().splitlines()]
    records[1]["teacher_topk"]["prompt"] = "0" * 16  # step 1 ran with another system prompt, say
    behavior.write_text("".join(json.dumps(r) + "\n" for r in records))
    utts, _ = read_behavior_data([behavior])
    with pytest.raises(InputError, match="another prompt") as err:
        build_items(tiny_model.processor, utts, opts)
    assert f"{behavior}:2:" in str(err.value)


def _saved_topk_trainer(tiny_dirs, tmp_path, tiny_model, n=4):
    """A trainer over step-1 data whose every line holds the teacher's top-k at K = the whole
    vocabulary (the saved teacher is then the teacher, to rounding), and the student's logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from blsp.continuation import ContinueOptions, run_continue

    llm = AutoModelForCausalLM.from_pretrained(tiny_dirs["llm"]).eval(), AutoTokenizer.from_pretrained(tiny_dirs["llm"])
    data = write_corpus(tmp_path / "data", n=n)
    behavior = tmp_path / "b.jsonl"
    run_continue(data, behavior, ContinueOptions(max_new_tokens=5, save_topk=llm[0].config.vocab_size),
                 model_and_tokenizer=llm)
    utts, _ = read_behavior_data([behavior])
    trainer = Trainer(tiny_model, utts, options(tiny_dirs, tmp_path, loss="kl", max_target_tokens=4), tmp_path / "run")
    batch = tiny_model.processor.collate([trainer.example(it) for it in trainer.items])
    with torch.no_grad():
        student = tiny_model(**batch, return_target_logits=True).target_logits
    return trainer, student, behavior


def test_kl_mixes_saved_top_k_and_the_live_teacher_item_by_item(tiny_dirs, tmp_path, tiny_model, monkeypatch):
    """A micro-batch in which some items have no saved top-k (--mix draws such items) runs the
    teacher on those items alone and gives the loss of the live teacher on every item."""
    trainer, student, _ = _saved_topk_trainer(tiny_dirs, tmp_path, tiny_model)
    items = trainer.items
    fresh = [BehaviorItem(it.utterance, it.prompt, it.teacher_prompt, it.target) for it in items]
    mixed = [items[0], fresh[1], items[2], fresh[3]]
    forwards = []
    real = Trainer.teacher_logits
    monkeypatch.setattr(Trainer, "teacher_logits", lambda self, its: forwards.append(len(its)) or real(self, its))
    all_live = trainer.distillation(fresh, student)
    assert forwards == [4]
    torch.testing.assert_close(trainer.distillation(mixed, student), all_live, atol=1e-3, rtol=1e-3)
    assert forwards == [4, 2]  # the teacher read only the two items without a saved top-k
    assert float(all_live) > 0
    trainer.distillation(items, student)
    assert forwards == [4, 2]  # all saved: no teacher forward

    # Under a sharded LLM (every forward a collective) a rank whose items are all saved still runs
    # the teacher when another rank needs it, and ignores its logits.
    import blsp.trainer

    monkeypatch.setattr(blsp.trainer, "is_sharded", lambda model: True)
    monkeypatch.setattr(blsp.trainer, "all_reduce_sum", lambda flag: flag + 1)  # another rank needs it
    saved_only = trainer.distillation(items, student)
    assert forwards == [4, 2, 1]
    torch.testing.assert_close(saved_only, all_live, atol=1e-3, rtol=1e-3)
    monkeypatch.setattr(blsp.trainer, "all_reduce_sum", lambda flag: flag)  # no rank needs it
    trainer.distillation(items, student)
    assert forwards == [4, 2, 1]


def test_top_k_saved_by_another_llm_is_refused_with_its_line(tiny_dirs, tmp_path, tiny_model):
    from blsp.errors import InputError

    trainer, _, behavior = _saved_topk_trainer(tiny_dirs, tmp_path, tiny_model, n=2)
    records = [json.loads(l) for l in behavior.read_text().splitlines()]
    assert all(r["teacher_topk"]["llm"] == tiny_model.config.llm_fingerprint for r in records)
    records[1]["teacher_topk"]["llm"] = "0" * 16  # a fine-tune with the same tokenizer, say
    behavior.write_text("".join(json.dumps(r) + "\n" for r in records))
    utts, _ = read_behavior_data([behavior])
    with pytest.raises(InputError, match="saved by LLM 0000000000000000") as err:
        build_items(tiny_model.processor, utts, trainer.options, tiny_model.config.llm_fingerprint)
    assert f"{behavior}:2:" in str(err.value)
    del records[1]["teacher_topk"]["llm"]  # written before the LLM was recorded: cannot tell
    behavior.write_text("".join(json.dumps(r) + "\n" for r in records))
    utts, _ = read_behavior_data([behavior])
    with pytest.raises(InputError, match="not recorded"):
        build_items(tiny_model.processor, utts, trainer.options, tiny_model.config.llm_fingerprint)


def test_errors_about_a_value_the_recipe_set_say_so(tiny_dirs, tmp_path):
    from blsp.errors import BlspError
    from blsp.streaming import check_streaming_options
    from blsp.options import TrainOptions

    with pytest.raises(BlspError, match="--lora-rank with --fsdp") as err:
        TrainOptions.from_preset("fast", fsdp=True)
    assert "(--lora-rank 8 set by --preset fast, not by a flag: pass --preset paper, or --lora-rank 0)" in str(err.value)
    with pytest.raises(BlspError) as err:  # the user typed --lora-rank: nothing to blame on the recipe
        TrainOptions.from_preset("fast", fsdp=True, lora_rank=8)
    assert "recipe" not in str(err.value)
    with pytest.raises(BlspError) as err:
        check_streaming_options(TrainOptions.from_preset("fast"))
    assert str(err.value).endswith("(--warm-start ctc --compress-speech ctc set by --preset fast, not by a flag: "
                                   "pass --preset paper, or --warm-start none --compress-speech none)")
    with pytest.raises(BlspError) as err:  # a warm start given, compression the recipe's
        check_streaming_options(TrainOptions.from_preset("fast", warm_start="ctc"))
    assert "(--compress-speech ctc set by --preset fast" in str(err.value)
    check_streaming_options(TrainOptions.from_preset("paper"))


def test_flags_typed_over_the_default_recipe_win_over_its_mix_and_lora_rate():
    from blsp.errors import BlspError
    from blsp.options import TrainOptions, mix_shares

    assert mix_shares(TrainOptions.from_preset("decoder")) == {"transcribe": 0.3}
    # a typed --mix transcribe=... replaces the recipe's share; another task adds to it
    assert mix_shares(TrainOptions.from_preset("decoder", mix="transcribe=0.1")) == {"transcribe": 0.1}
    assert mix_shares(TrainOptions.from_preset("decoder", mix="summarize=0.2")) == {"summarize": 0.2, "transcribe": 0.3}
    with pytest.raises(BlspError) as err:
        TrainOptions.from_preset("decoder", mix="summarize=0.8")
    assert str(err.value) == ("the --mix shares add up to 1.1, more than 1 (--mix-transcribe 0.3 set by --preset "
                              "decoder, not by a flag: pass --preset paper, or --mix-transcribe 0.0)")
    with pytest.raises(BlspError, match="give the transcribe share once"):  # both typed
        TrainOptions.from_preset("decoder", mix="transcribe=0.1", mix_transcribe=0.2)
    # --lora-rank 0 typed: the recipe's LoRA rate goes unused, not refused; a typed one is refused
    assert TrainOptions.from_preset("decoder", lora_rank=0).lora.rank == 0
    with pytest.raises(BlspError, match="--lora-lr 0.003: needs --lora-rank"):
        TrainOptions.from_preset("paper", lora_lr=3e-3)


def test_a_checkpoint_written_before_newer_options_resumes(tiny_dirs, tmp_path):
    """Options added since a checkpoint was written had their defaults there; the warm start's own
    switches may change (it does not run again)."""
    import shutil

    from blsp.trainer import STATE_FILE

    data = write_corpus(tmp_path / "data", n=4, with_continuation=True)
    opts = options(tiny_dirs, tmp_path, max_steps=4)
    run_train([data], tmp_path / "full", opts)
    run_train([data], tmp_path / "old", opts)
    # the summary says what filling the feature cache cost: the first run encoded the 4 clips
    summaries = [json.loads((tmp_path / run / "train_summary.json").read_text()) for run in ("full", "old")]
    assert [s["clips_encoded"] for s in summaries] == [4, 0] and summaries[0]["features_s"] >= 0
    checkpoints = tmp_path / "old" / "checkpoints"
    shutil.rmtree(checkpoints / "step-4")
    state = torch.load(checkpoints / "step-2" / STATE_FILE, weights_only=False)
    for key in ("mix", "warm_start_time_masks", "warm_start_feature_masks", "warm_start_bucket_by_length",
                "max_target_tokens", "lora_lr"):
        del state["options"][key]  # an older version wrote none of these
    torch.save(state, checkpoints / "step-2" / STATE_FILE)
    run_train([data], tmp_path / "old", options(tiny_dirs, tmp_path, max_steps=4, warm_start_time_masks=2),
              resume=True)
    full, resumed = adapter_of(tmp_path / "full"), adapter_of(tmp_path / "old")
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=1e-5, atol=1e-6, msg=k)


def test_a_refused_resume_names_the_preset_the_run_started_with(tmp_path):

    from blsp.errors import CheckpointError
    from blsp.options import TrainOptions, check_resumable

    paper = TrainOptions.from_preset("paper")
    check_resumable(tmp_path, {"lr": paper.optim.lr}, paper)  # every other option at its default
    with pytest.raises(CheckpointError) as err:
        check_resumable(tmp_path, paper.flat(), TrainOptions.from_preset("fast"))
    assert "adapter_downsample: 8 -> 4" in str(err.value)
    assert "--preset sets --adapter-downsample, " in str(err.value) and ", --warm-start, " in str(err.value)
    assert str(err.value).endswith("pass --preset paper, whose values it started with")
    with pytest.raises(CheckpointError) as err:
        check_resumable(tmp_path, paper.flat(), TrainOptions.from_preset("paper", lr=1.0))
    assert "recipe" not in str(err.value)


def test_mix_tasks_and_top_k_width_are_checked_before_any_clip_is_encoded(tiny_dirs, tmp_path, monkeypatch):
    import blsp.training
    from blsp.errors import BlspError, InputError

    def no_model(*args, **kwargs):
        raise AssertionError("the data should have been refused before loading the models")

    monkeypatch.setattr(blsp.training.BlspModel, "from_components", no_model)
    with pytest.raises(BlspError, match="--mix 'continuation=0.1'"):
        options(tiny_dirs, tmp_path, mix="continuation=0.1")
    data = write_corpus(tmp_path / "data", n=3, with_continuation=True)
    records = [json.loads(l) for l in data.read_text().splitlines()]
    for rec in records:
        rec["responses"] = {"summarize": {"instruction": "Summarize the text.", "text": "s", "truncated": False}}
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(BlspError, match=r"no line of .* has a step-1 answer for task 'sumarize' \(its tasks: summarize\)"):
        run_train([data], tmp_path / "run", options(tiny_dirs, tmp_path, mix="sumarize=0.1"))
    del records[2]["responses"]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(InputError, match="no step-1 answer") as err:  # any line may be drawn for the task
        run_train([data], tmp_path / "run", options(tiny_dirs, tmp_path, mix="summarize=0.1"))
    assert f"{data}:3:" in str(err.value)

    for i, rec in enumerate(records):  # lines of two step-1 runs, with --save-topk 2 and 3
        k = 2 if i < 2 else 3
        rec["teacher_topk"] = {"k": k, "prompt": "p", "target_ids": [1], "ids": [list(range(k))],
                               "logprobs": [[-1.0] * k]}
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(InputError, match=f"K 3 here, but K 2 at {data}:1") as err:
        run_train([data], tmp_path / "run", options(tiny_dirs, tmp_path, loss="ce+kl"))
    assert str(err.value).startswith(f"{data}:3:")


def test_a_steps_record_reads_its_parts_per_target_token():
    from blsp.trainer import step_record

    record = step_record({"loss": torch.tensor(6.0), "ctc": torch.tensor(3.0, dtype=torch.float64)},
                         torch.tensor(0.5), n_tokens=3)
    assert record == {"ctc": 1.0, "loss": 2.0, "grad_norm": 0.5}


def test_feature_memory_must_not_be_negative():
    from blsp.errors import BlspError

    with pytest.raises(BlspError, match="--feature-memory-mb -1"):
        TrainOptions.from_flat(feature_memory_mb=-1)


def test_training_in_bf16_keeps_the_frozen_llm_in_bf16_and_what_trains_in_fp32(tiny_dirs, tmp_path):
    from blsp.modeling import BlspModel

    data = write_corpus(tmp_path / "data", n=4, with_continuation=True)
    opts = options(tiny_dirs, tmp_path, max_steps=2, precision="bf16", lora_rank=2, **COMPRESSING)
    model = BlspModel.from_components(opts.model.encoder, opts.model.llm, seed=0)
    result = run_train([data], tmp_path / "run", opts, model=model)
    frozen = {p.dtype for p in model.language_model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in model.trainable_parameters()}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}
    assert all(p.dtype == torch.float32 for p in model.audio_tower.parameters())  # its cached features' encoder
    log = [json.loads(l) for l in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert result["steps"] == 2 and all(math.isfinite(r["loss"]) for r in log)


@pytest.mark.parametrize("llm_dtype", ["auto", "fp32"])
def test_training_in_fp32_or_told_so_leaves_the_llm_as_loaded(tiny_dirs, tmp_path, llm_dtype):
    from blsp.modeling import BlspModel

    data = write_corpus(tmp_path / "data", n=4, with_continuation=True)
    precision = "fp32" if llm_dtype == "auto" else "bf16"
    opts = options(tiny_dirs, tmp_path, max_steps=1, precision=precision, llm_dtype=llm_dtype)
    model = BlspModel.from_components(opts.model.encoder, opts.model.llm, seed=0)
    run_train([data], tmp_path / "run", opts, model=model)
    assert {p.dtype for p in model.language_model.parameters()} == {torch.float32}


def test_init_from_goes_on_from_the_saved_model_without_a_warm_start(tiny_dirs, tmp_path):
    data = write_corpus(tmp_path / "data", n=4, with_continuation=True, seconds=3.0)
    levers = dict(COMPRESSING, lora_rank=2)
    run_train([data], tmp_path / "first", options(tiny_dirs, tmp_path, max_steps=2, **levers))
    saved = adapter_of(tmp_path / "first")
    # At lr 0 the second run changes nothing: what it saves is what it loaded, CTC head and LoRA included.
    run_train([data], tmp_path / "more", options(tiny_dirs, tmp_path, max_steps=2, lr=0.0, compress_speech="ctc",
                                                 lora_rank=2, init_from=str(tmp_path / "first")))
    more = adapter_of(tmp_path / "more")
    assert more.keys() == saved.keys() and any(k.startswith("lora.") for k in more)
    for k in saved:
        torch.testing.assert_close(more[k], saved[k], msg=k)
    assert not (tmp_path / "more" / "warm_start_log.json").exists()
    summary = json.loads((tmp_path / "more" / "train_summary.json").read_text())
    assert summary["warm_start_clips"] == 0 and summary["options"]["init_from"] == str(tmp_path / "first")
    # and it trains: at the usual rate the adapter moves
    run_train([data], tmp_path / "trained", options(tiny_dirs, tmp_path, max_steps=2, compress_speech="ctc",
                                                    lora_rank=2, init_from=str(tmp_path / "first")))
    moved = adapter_of(tmp_path / "trained")
    assert any(not torch.equal(moved[k], saved[k]) for k in saved)


def test_init_from_refuses_other_settings_and_a_warm_start(tiny_dirs, tmp_path):
    from blsp.errors import BlspError

    data = write_corpus(tmp_path / "data", n=3, with_continuation=True)
    run_train([data], tmp_path / "first", options(tiny_dirs, tmp_path, max_steps=1))
    first = str(tmp_path / "first")
    with pytest.raises(BlspError, match=r"trained with --adapter-downsample 8 --lora-rank 0, this run asks for "
                                        r"--adapter-downsample 4 --lora-rank 2"):
        run_train([data], tmp_path / "x", options(tiny_dirs, tmp_path, adapter_downsample=4, lora_rank=2,
                                                  init_from=first))
    with pytest.raises(BlspError, match="without a warm start: drop --warm-start"):
        options(tiny_dirs, tmp_path, init_from=first, warm_start="ctc", warm_start_steps=5)
    # --preset fast's warm start is skipped, not refused; its other settings still must match the model
    with pytest.raises(BlspError, match=r"set by --preset fast, not by a flag"):
        run_train([data], tmp_path / "y", TrainOptions.from_preset(
            "fast", encoder=tiny_dirs["encoder"], llm=tiny_dirs["llm"], init_from=first, max_steps=1,
            feature_cache=str(tmp_path / "features"), precision="fp32"))


def test_the_decoder_recipe_trains_on_whisper_decoder_states(tiny_dirs, tiny_whisper_dir, tmp_path):
    data = write_corpus(tmp_path / "data", n=4, with_continuation=True)
    opts = TrainOptions.from_preset("decoder", encoder=tiny_whisper_dir, llm=tiny_dirs["llm"], batch_size=2, lr=1e-2,
                                    warmup_steps=1, max_steps=3, save_every=2, precision="fp32",
                                    feature_cache=str(tmp_path / "features"))
    assert (opts.model.speech_states, opts.model.adapter, opts.model.adapter_downsample, opts.lora.rank,
            opts.objective.loss) == ("decoder", "stack", 1, 0, "kl")
    run_train([data], tmp_path / "run", opts)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["speech_states"] == "decoder" and config["decoder_ids"]["eot"] >= 0
    assert len((tmp_path / "run" / "train_log.jsonl").read_text().splitlines()) == 3
    # the cache holds the decoder's states, apart from any encoder features
    (cached,) = [d.name for d in (tmp_path / "features").iterdir()]
    assert "-decoder-" in cached and len(list((tmp_path / "features").rglob("*.npy"))) == 4


def test_a_correction_penalty_is_logged_and_keeps_the_bridges_correction_smaller(tiny_dirs, tiny_whisper_dir, tmp_path):
    from safetensors.torch import load_file

    data = write_corpus(tmp_path / "data", n=4, with_continuation=True)
    norms = {}
    for weight in (0.0, 50.0):
        run = tmp_path / f"run-{weight}"
        opts = TrainOptions.from_preset("decoder", encoder=tiny_whisper_dir, llm=tiny_dirs["llm"], batch_size=2,
                                        lr=1e-2, warmup_steps=1, max_steps=4, precision="fp32", mix_transcribe=0.0,
                                        correction_weight=weight, feature_cache=str(tmp_path / "features"))
        run_train([data], run, opts)
        log = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
        if weight:
            # the correction starts at zero (BlspModel.init_adapter), then grows and is charged for it
            assert log[0]["correction"] == 0.0 and log[-1]["correction"] > 0
        else:
            assert "correction" not in log[0]
        weights = load_file(run / "adapter.safetensors")
        # the correction's size is its LayerNorm's gain and bias (both start at zero)
        norms[weight] = sum(float(w.float().norm()) for name, w in weights.items() if ".norm." in f".{name}")
    assert norms[50.0] < norms[0.0]


@pytest.mark.parametrize("lever", [dict(warm_start="ctc", warm_start_steps=5), dict(compress_speech="ctc"),
                                   dict(unfreeze_encoder_layers=1)])
def test_decoder_states_refuse_the_levers_of_encoder_frames_before_anything_loads(lever):
    from blsp.errors import BlspError

    with pytest.raises(BlspError, match="not with --speech-states decoder"):
        TrainOptions.from_flat(speech_states="decoder", adapter="stack", adapter_downsample=1, **lever)
    with pytest.raises(BlspError, match="--preset fast"):  # the fast preset's warm start, named as the preset's
        TrainOptions.from_preset("fast", speech_states="decoder")


def test_speech_language_belongs_to_decoder_states_and_must_be_whispers(tiny_dirs):
    from blsp.errors import BlspError

    with pytest.raises(BlspError, match="add --speech-states decoder"):
        TrainOptions.from_flat(speech_language="fr")
    with pytest.raises(BlspError, match="language codes"):
        TrainOptions.from_preset("decoder", speech_language="french")
    assert TrainOptions.from_preset("decoder", speech_language="auto").model.speech_language == "auto"


def test_under_kl_a_transcription_item_is_learnt_by_cross_entropy_and_the_rest_distilled(tiny_dirs, tmp_path,
                                                                                         tiny_model, monkeypatch):
    """--loss kl distils the LLM's behaviour; a mixed-in transcript is the one right answer, so it
    is trained by cross-entropy (distilled, it taught the text path's reply to "transcribe" over a
    transcript it can read, not the words: 96% WER on the demo)."""
    import dataclasses

    data = write_corpus(tmp_path / "data", n=4, with_continuation=True)
    utts, _ = read_behavior_data([data])
    trainer = Trainer(tiny_model, utts, options(tiny_dirs, tmp_path, loss="kl"), tmp_path / "run")
    continuing = trainer.items[:2]
    transcribing = [dataclasses.replace(it, exact=True) for it in trainer.items[2:]]
    trainer.items = continuing + transcribing
    with torch.no_grad():
        loss, parts = trainer.micro_batch_loss([0, 1, 2, 3])
        kl_only, _ = trainer.micro_batch_loss([0, 1])
        ce_only, ce_parts = trainer.micro_batch_loss([2, 3])
    assert float(ce_parts["kl"]) == 0 and float(ce_only) > 0
    torch.testing.assert_close(ce_only, ce_parts["loss"])  # the items' summed cross-entropy
    torch.testing.assert_close(loss, kl_only + ce_only, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(parts["kl"], kl_only)

    # Under a sharded LLM a micro-batch of transcription items alone still joins the teacher's
    # forward that another rank runs (a collective), and its loss is still their cross-entropy.
    import blsp.trainer

    forwards = []
    real = Trainer.teacher_logits
    monkeypatch.setattr(Trainer, "teacher_logits", lambda self, its: forwards.append(len(its)) or real(self, its))
    monkeypatch.setattr(blsp.trainer, "is_sharded", lambda model: True)
    monkeypatch.setattr(blsp.trainer, "all_reduce_sum", lambda flag: flag + 1)  # another rank needs it
    with torch.no_grad():
        sharded, _ = trainer.micro_batch_loss([2, 3])
    assert forwards == [1]
    torch.testing.assert_close(sharded, ce_only)


def test_mix_voice_asks_any_stated_attribute_plainly_and_the_rare_classes_more(tiny_dirs, tmp_path, tiny_model):
    """Lines that state their voice but were asked nothing at step 1 still answer about it (the
    plain fact, read beside the description); a whisperer is asked whether it whispers far more
    often than its share of the lines."""
    from collections import Counter

    from blsp.behavior import voice_answer

    data = write_corpus(tmp_path / "data", n=6, with_continuation=True)
    records = [json.loads(l) for l in data.read_text().splitlines()]
    records = [dict(r, id=f"{r['id']}-{k}") for k in range(40) for r in records]  # 240 lines
    for i, rec in enumerate(records):
        rec.update(gender="female" if i % 2 else "male", whispered="yes" if i % 12 == 0 else "no")
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    utts, _ = read_behavior_data([data])
    proc = tiny_model.processor
    answer = voice_answer(utts[0], "voice_whispered")
    assert answer["text"] == "The speaker is whispering, so: yes." and answer["written_by"] == "plain"
    assert answer["heard"].startswith("The speaker is a man, whispering.")
    # step 1's plain fact is re-derived as the code phrases it now; the LLM's own answer is kept
    old = {"instruction": "Is the speaker whispering?", "text": "Yes, the speaker is whispering.",
           "truncated": False, "heard": "h"}
    utts[0].extra["responses"] = {"voice_whispered": {**old, "written_by": "plain"},
                                  "voice_gender": {**old, "text": "A man.", "written_by": "llm"}}
    assert voice_answer(utts[0], "voice_whispered")["text"] == "The speaker is whispering, so: yes."
    assert voice_answer(utts[0], "voice_gender")["text"] == "A man."
    del utts[0].extra["responses"]
    items = build_items(proc, utts, options(tiny_dirs, tmp_path, mix="voice=1"))
    asked = Counter()
    for item, u in zip(items, utts):
        assert item.exact
        task = next(t for t in ("voice_gender", "voice_whispered", "voice_describe")
                    if item.target == proc.prompt.target_ids(voice_answer(u, t)["text"]))
        asked[(task, u.extra["whispered"])] += 1
    # 20 whisperers of 240, weighted 12 (to gender's 2 and the description's 7): 57% of them are
    # asked it (a third if drawn uniformly); their peers' "no" weighs 1.1, so 24% of those are
    yes = asked[("voice_whispered", "yes")] / 20
    no = asked[("voice_whispered", "no")] / 220
    assert yes > 0.45 and no < 0.33, asked
