"""The pipeline on the real packaged models: Whisper-base + each packaged LLM (SmolLM2-135M-Instruct,
a chat model; Gemma 3 270M, a base model prompted in plain text).

Real behaviour, not just shapes: the LLM's continuation is far more likely given the transcript
than given no transcript; one training step lowers the speech-conditioned loss on its batch;
the trained adapter generates from speech.
"""

from __future__ import annotations

import json

import pytest
import torch

from blsp.continuation import ContinueOptions, run_continue
from blsp.modeling import BlspModel
from blsp.processing import Example
from blsp.prompts import CONTINUATION_INSTRUCTION, task_instruction
from blsp.behavior import read_behavior_data
from blsp.options import TrainOptions
from blsp.training import run_train

from conftest import speak

pytestmark = pytest.mark.real

SENTENCES = [
    ("The weather was cold and the wind blew across the empty field.", "awb"),
    ("She opened the old book and found a letter hidden inside.", "slt"),
    ("Our team won the final match after a long and difficult season.", "kal16"),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    lines = []
    for i, (text, voice) in enumerate(SENTENCES):
        speak(text, root / f"u{i}.wav", voice)
        lines.append(json.dumps({"id": f"u{i}", "audio": f"u{i}.wav", "text": text}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module", params=["smollm2-135m-instruct", "gemma3-270m"])
def model(request):
    return BlspModel.from_components("whisper-base", request.param, seed=0)


@pytest.fixture(scope="module")
def behavior(corpus, model):
    out = corpus / f"behavior-{model.language_model.config.model_type}.jsonl"  # one per LLM: step 1 fingerprints it
    llm = (model.language_model, model.processor.tokenizer)
    run_continue(corpus / "manifest.jsonl", out, ContinueOptions(max_new_tokens=32, batch_size=3),
                 model_and_tokenizer=llm)
    return out


def test_step1_continuations_are_real_text(behavior):
    rows = [json.loads(line) for line in behavior.read_text().splitlines()]
    assert len(rows) == 3
    for r in rows:
        assert len(r["continuation"].split()) >= 3, r
        assert r["prompt_transcript"] == r["text"].strip()  # as written: what Whisper's words look like


def test_transcript_makes_the_continuation_far_more_likely(behavior, model):
    utts, _ = read_behavior_data([behavior])
    proc = model.processor
    with_text, without = [], []
    for u in utts:
        target = proc.prompt.target_ids(u.extra["continuation"], u.extra["truncated"])
        with_text.append(Example(pieces=proc.transcript_prompt(CONTINUATION_INSTRUCTION, u.extra["prompt_transcript"]), target=target))
        without.append(Example(pieces=proc.prompt.render([{"role": "user", "content": CONTINUATION_INSTRUCTION}]), target=target))
    with torch.no_grad():
        loss_text = model(**proc.collate(with_text)).loss.item()
        loss_none = model(**proc.collate(without)).loss.item()
    assert loss_text < 0.6 * loss_none, (loss_text, loss_none)


def test_one_train_step_then_generate(behavior, model, tmp_path):
    before = {k: v.clone() for k, v in model.adapter.state_dict().items()}
    options = TrainOptions.from_flat(batch_size=3, max_steps=2, lr=1e-4, warmup_steps=0, lr_schedule="constant",
                           feature_cache=str(tmp_path / "features"))
    run_train([behavior], tmp_path / "run", options, model=model)
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(0.1 < r["loss"] < 10 for r in log)
    # the same batch twice: the first step must have lowered its loss
    assert log[1]["loss"] < log[0]["loss"], log
    assert any(not torch.equal(before[k], v) for k, v in model.adapter.state_dict().items())

    loaded = BlspModel.from_pretrained(tmp_path / "run")
    answers = loaded.generate(audio=[str(behavior.parent / "u0.wav"), str(behavior.parent / "u1.wav")],
                              instruction=task_instruction("transcribe"), max_new_tokens=12)
    assert len(answers) == 2 and all(isinstance(a, str) and a for a in answers)
