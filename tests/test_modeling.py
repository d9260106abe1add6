"""The model as one: splicing, labels, padding, the loss, freezing, save/load and the backbones it names."""

from __future__ import annotations

import pytest
import torch

from blsp.modeling import BlspModel
from blsp.processing import IGNORE_INDEX, SPEECH_TOKEN_ID
from blsp.prompts import AudioSlot, CONTINUATION_INSTRUCTION

from conftest import make_examples


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

