"""Step 1: batched greedy continuation, resume, stale-settings refusal, sharding helpers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from blsp.continuation import ContinueOptions, Continuer, merge_parts, part_path, run_continue
from blsp.errors import BlspError

from conftest import write_corpus


@pytest.fixture(scope="module")
def llm(tiny_dirs):
    return AutoModelForCausalLM.from_pretrained(tiny_dirs["llm"]).eval(), AutoTokenizer.from_pretrained(tiny_dirs["llm"])


def lines(path):
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()]


def test_batched_left_padded_generation_equals_one_at_a_time(llm):
    continuer = Continuer(*llm, ContinueOptions(max_new_tokens=12))
    prompts = [continuer.prompt_ids(t) for t in ["hello world", "the quick brown fox jumps over the lazy dog", "a"]]
    batched = continuer.continue_batch(prompts)
    single = [continuer.continue_batch([p])[0] for p in prompts]
    assert batched == single
    assert all(isinstance(text, str) and isinstance(trunc, bool) for text, trunc in batched)


def test_greedy_generate_drops_finished_rows_yet_matches_generate(llm):
    import torch

    from blsp.continuation import greedy_generate

    model, _ = llm
    continuer = Continuer(*llm, ContinueOptions(max_new_tokens=10))
    prompts = [continuer.prompt_ids(t) for t in ["hello world", "the quick brown fox jumps over the lazy dog", "a b"]]
    width = max(map(len, prompts))
    ids = torch.tensor([[continuer.pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    free = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)[:, width:]
    stop = int(free[0, 2])  # row 0 stops at its third token; the others go on (or stop too)
    reference = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                               eos_token_id=stop, pad_token_id=continuer.pad_id)[:, width:].tolist()
    ours = greedy_generate(model, ids, mask, 10, [stop])
    assert len(ours[0]) == 3 and ours[0][-1] == stop
    for row, ref in zip(ours, reference):
        cut = ref.index(stop) + 1 if stop in ref else len(ref)
        assert row == ref[:cut]


def test_shared_prompt_prefix_runs_once_and_changes_no_token(llm, monkeypatch):
    from blsp import continuation
    from blsp.continuation import common_prefix_length

    continuer = Continuer(*llm, ContinueOptions(max_new_tokens=10))
    prompts = [continuer.prompt_ids(t) for t in ["hello world", "the quick brown fox jumps over the lazy dog", "a b"]]
    n = common_prefix_length(prompts)
    assert 0 < n < min(map(len, prompts)) and all(p[:n] == prompts[0][:n] for p in prompts)
    calls = []
    real = continuation.greedy_generate

    def recorded(*args, **kwargs):
        calls.append(kwargs.get("shared_prefix", 0))
        return real(*args, **kwargs)

    monkeypatch.setattr(continuation, "greedy_generate", recorded)
    shared = continuer.continue_batch(prompts)
    monkeypatch.setattr(continuation, "common_prefix_length", lambda prompts: 0)  # the plain left-padded batch
    plain = continuer.continue_batch(prompts)
    assert calls == [n, 0] and shared == plain


def test_common_prefix_leaves_each_prompt_a_token_of_its_own():
    from blsp.continuation import common_prefix_length

    assert common_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2
    assert common_prefix_length([[1, 2, 3], [1, 5]]) == 1
    assert common_prefix_length([[7], [7, 8]]) == 0


def test_continue_writes_every_line_with_fingerprint_and_resumes(tmp_path, llm):
    manifest = write_corpus(tmp_path / "data", n=6)
    opts = ContinueOptions(max_new_tokens=8, batch_size=4)
    out = tmp_path / "behavior.jsonl"
    summary = run_continue(manifest, out, opts, model_and_tokenizer=llm)
    full = lines(out)
    assert summary.written == 6 and len(full) == 6
    assert {r["id"] for r in full} == {f"u{i}" for i in range(6)}
    assert len({r["fingerprint"] for r in full}) == 1
    # a truncated continuation used all the tokens it was allowed
    assert all(isinstance(r["continuation"], str) and isinstance(r["truncated"], bool) for r in full)
    # the audio path stays valid relative to the output's directory
    assert all((out.parent / r["audio"]).exists() for r in full)

    # simulate a kill: two complete lines and a half-written third survive
    text = out.read_text().splitlines(keepends=True)
    out.write_text("".join(text[:2]) + text[2][:15])
    summary = run_continue(manifest, out, opts, model_and_tokenizer=llm)
    assert summary.already_done == 2 and summary.written == 4
    resumed = lines(out)
    assert sorted(resumed, key=lambda r: r["id"]) == sorted(full, key=lambda r: r["id"])


def test_limit_continues_the_manifests_first_utterances_and_a_larger_one_resumes(tmp_path, llm):
    manifest = write_corpus(tmp_path / "data", n=6)
    opts = ContinueOptions(max_new_tokens=4, batch_size=4)
    out = tmp_path / "behavior.jsonl"
    assert run_continue(manifest, out, opts, model_and_tokenizer=llm, limit=3).written == 3
    assert sorted(r["id"] for r in lines(out)) == ["u0", "u1", "u2"]
    summary = run_continue(manifest, out, opts, model_and_tokenizer=llm, limit=5)
    assert (summary.already_done, summary.written) == (3, 2)
    with pytest.raises(BlspError, match="--limit 0"):
        run_continue(manifest, out, opts, model_and_tokenizer=llm, limit=0)


def test_skip_and_limit_continue_a_window_of_the_manifest(tmp_path, llm):
    manifest = write_corpus(tmp_path / "data", n=6)
    opts = ContinueOptions(max_new_tokens=4, batch_size=4)
    out = tmp_path / "round2.jsonl"
    assert run_continue(manifest, out, opts, model_and_tokenizer=llm, skip=2, limit=3).written == 3
    assert sorted(r["id"] for r in lines(out)) == ["u2", "u3", "u4"]
    assert run_continue(manifest, tmp_path / "rest.jsonl", opts, model_and_tokenizer=llm, skip=4).written == 2
    with pytest.raises(BlspError, match="--skip 6 leaves none of its 6 utterances"):
        run_continue(manifest, tmp_path / "none.jsonl", opts, model_and_tokenizer=llm, skip=6)
    with pytest.raises(BlspError, match="--skip -1"):
        run_continue(manifest, tmp_path / "none.jsonl", opts, model_and_tokenizer=llm, skip=-1)


def test_other_settings_into_the_same_output_are_refused(tmp_path, llm):
    manifest = write_corpus(tmp_path / "data", n=2)
    out = tmp_path / "behavior.jsonl"
    run_continue(manifest, out, ContinueOptions(max_new_tokens=4), model_and_tokenizer=llm)
    with pytest.raises(BlspError, match="other step-1 settings"):
        run_continue(manifest, out, ContinueOptions(max_new_tokens=5), model_and_tokenizer=llm)


def test_prompts_over_the_limit_are_dropped(tmp_path, llm):
    manifest = write_corpus(tmp_path / "data", n=3)
    out = tmp_path / "behavior.jsonl"
    summary = run_continue(manifest, out, ContinueOptions(max_new_tokens=4, max_prompt_tokens=10),
                           model_and_tokenizer=llm)
    assert len(summary.dropped_long) == 3 and not out.exists()


def test_rank_parts_merge_into_the_output_once(tmp_path):
    out = tmp_path / "b.jsonl"
    out.write_text(json.dumps({"id": "a"}) + "\n")
    part_path(out, 0, 2).write_text(json.dumps({"id": "b"}) + "\n" + json.dumps({"id": "a"}) + "\n")
    part_path(out, 1, 2).write_text(json.dumps({"id": "c"}) + "\n" + '{"id": "trunc')
    merge_parts(out)
    assert [r["id"] for r in lines(out)] == ["a", "b", "c"]
    assert not list(tmp_path.glob("b.jsonl.rank*"))


def test_a_transcript_spoken_by_several_voices_is_continued_once(tmp_path, llm, monkeypatch):
    manifest = write_corpus(tmp_path / "data", n=3)
    rows = [json.loads(l) for l in manifest.read_text().splitlines()]
    rows += [{**r, "id": r["id"] + "_again"} for r in rows]  # same transcripts, same clips, new ids
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    generated = []
    real = Continuer.continue_batch
    monkeypatch.setattr(Continuer, "continue_batch", lambda self, p, *keys: generated.extend(p) or real(self, p, *keys))
    out = tmp_path / "behavior.jsonl"
    summary = run_continue(manifest, out, ContinueOptions(max_new_tokens=5), model_and_tokenizer=llm)
    assert len(generated) == 3 and summary.written == 6
    by_id = {r["id"]: r["continuation"] for r in lines(out)}
    assert all(by_id[f"u{i}"] == by_id[f"u{i}_again"] for i in range(3))


def test_an_instruction_set_adds_each_tasks_answer_and_resumes(tmp_path, llm):
    from blsp.continuation import read_instruction_set

    tasks = tmp_path / "tasks.yaml"
    tasks.write_text("summarize: Summarize the following text.\nquestion: Ask a question about the following text.\n")
    instruction_set = read_instruction_set(tasks)
    assert instruction_set == (("summarize", "Summarize the following text."),
                               ("question", "Ask a question about the following text."))
    manifest = write_corpus(tmp_path / "data", n=5)
    opts = ContinueOptions(max_new_tokens=6, batch_size=2, instruction_set=instruction_set)
    out = tmp_path / "behavior.jsonl"
    run_continue(manifest, out, opts, model_and_tokenizer=llm)
    records = lines(out)
    assert len(records) == 5
    continuer = Continuer(*llm, opts)
    for rec in records:  # each answer is what the LLM writes for that instruction alone
        assert set(rec["responses"]) == {"summarize", "question"}
        for task, instruction in instruction_set:
            ids = continuer.prompt_ids(rec["prompt_transcript"], instruction)
            text, truncated = continuer.continue_batch([ids])[0]
            assert rec["responses"][task] == {"instruction": instruction, "text": text, "truncated": truncated}
        assert (rec["continuation"], rec["truncated"]) == continuer.continue_batch(
            [continuer.prompt_ids(rec["prompt_transcript"])])[0]
    plain = ContinueOptions(max_new_tokens=6, batch_size=2)  # another set: another fingerprint, refused
    with pytest.raises(BlspError, match="other step-1 settings"):
        run_continue(manifest, out, plain, model_and_tokenizer=llm)
    again = run_continue(manifest, out, opts, model_and_tokenizer=llm)
    assert again.already_done == 5 and len(lines(out)) == 5


@pytest.mark.parametrize("text, message, line", [
    ("summarize: Summarize it.\ntranscribe: Write it down.\n", "reserved", 2),
    ("voice_gender: Who speaks?\n", "reserved", 1),
    ("a: one\nb c: two\n", "task name", 2),
    ("a: one\na: two\n", "twice", 2),
    ("a: ''\n", "non-empty", 1),
    ("- a list\n", "mapping", 1),
    ("a: [unclosed\n", "not valid YAML", 2),
])
def test_a_bad_instruction_set_names_its_file_and_line(tmp_path, text, message, line):
    from blsp.continuation import read_instruction_set

    path = tmp_path / "tasks.yaml"
    path.write_text(text)
    with pytest.raises(BlspError, match=message) as err:
        read_instruction_set(path)
    assert f"{path}:{line}:" in str(err.value)


def _fake_vllm(tiny_llm_dir):
    """A stand-in for vLLM's offline API (LLM, SamplingParams, RequestOutput), greedy over the same
    weights with transformers: checks what our backend sends and how it reads the answers."""
    import importlib.machinery
    import types

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from blsp.continuation import greedy_generate

    vllm = types.ModuleType("vllm")
    vllm.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    vllm.calls = []

    class SamplingParams:
        def __init__(self, **kw):
            self.__dict__.update(kw)

    class LLM:
        def __init__(self, model, tokenizer, seed, enable_prefix_caching):
            self.model = AutoModelForCausalLM.from_pretrained(model).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer)

        def generate(self, prompts, params, use_tqdm=True):
            assert params.temperature == 0.0 and params.skip_special_tokens  # greedy, like the hf backend
            vllm.calls.append(len(prompts))
            results = []
            for p in prompts:
                ids = torch.tensor([p["prompt_token_ids"]])
                row = greedy_generate(self.model, ids, torch.ones_like(ids), params.max_tokens, params.stop_token_ids)[0]
                stopped = bool(row) and row[-1] in params.stop_token_ids
                text = self.tokenizer.decode(row[:-1] if stopped else row, skip_special_tokens=True)
                out = types.SimpleNamespace(text=text, finish_reason="stop" if stopped else "length")
                results.append(types.SimpleNamespace(outputs=[out]))
            return results

    vllm.LLM, vllm.SamplingParams = LLM, SamplingParams
    return vllm


def test_the_vllm_backend_sends_the_same_prompts_and_writes_the_same_lines(tmp_path, tiny_dirs, monkeypatch):
    import sys

    import torch

    vllm = _fake_vllm(tiny_dirs["llm"])
    manifest = write_corpus(tmp_path / "data", n=5)
    common = dict(llm=tiny_dirs["llm"], max_new_tokens=8, batch_size=2)
    hf = run_continue(manifest, tmp_path / "hf.jsonl", ContinueOptions(**common, backend="hf"))
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # vLLM's own device: never touched here
    fast = run_continue(manifest, tmp_path / "vllm.jsonl", ContinueOptions(**common, backend="vllm"))
    assert vllm.calls == [5]  # every prompt in one call: vLLM's scheduler batches them itself
    pick = lambda path: [(r["id"], r["continuation"], r["truncated"]) for r in lines(path)]
    assert pick(tmp_path / "vllm.jsonl") == pick(tmp_path / "hf.jsonl")
    assert fast.fingerprint != hf.fingerprint  # another backend's greedy tokens are its own


def test_the_vllm_backend_is_refused_clearly_where_it_cannot_run(monkeypatch):
    import importlib.util

    import torch

    from blsp.continuation import choose_backend

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BlspError, match="vLLM is not installed"):
        choose_backend("vllm")
    assert choose_backend("auto") == "hf"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BlspError, match="needs a CUDA GPU"):
        choose_backend("vllm")
    assert choose_backend("auto") == "hf"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_backend("auto") == "vllm" and choose_backend("auto", distributed=True) == "hf"
    with pytest.raises(BlspError, match="without torchrun"):
        choose_backend("vllm", distributed=True)


def test_save_topk_writes_the_teachers_top_k_at_each_continuation_token(tmp_path, llm):
    import torch

    from blsp.continuation import prompt_digest
    from blsp.fingerprint import weights_fingerprint

    model, _ = llm
    manifest = write_corpus(tmp_path / "data", n=3)
    opts = ContinueOptions(max_new_tokens=6, batch_size=2, save_topk=5)
    run_continue(manifest, tmp_path / "b.jsonl", opts, model_and_tokenizer=llm)
    continuer = Continuer(*llm, opts)
    for rec in lines(tmp_path / "b.jsonl"):
        saved = rec["teacher_topk"]
        prompt = continuer.prompt_ids(rec["prompt_transcript"])
        target = continuer.prompt.target_ids(rec["continuation"], rec["truncated"])
        assert saved["prompt"] == prompt_digest(prompt) and saved["target_ids"] == target and saved["k"] == 5
        assert saved["llm"] == weights_fingerprint(model)  # step 2 checks the teacher was its LLM
        with torch.no_grad():  # one row alone, no padding: the teacher's own distribution
            logits = model(input_ids=torch.tensor([prompt + target])).logits[0, len(prompt) - 1 : -1]
        values, ids = torch.log_softmax(logits.float(), dim=-1).topk(5, dim=-1)
        assert saved["ids"] == ids.tolist()
        torch.testing.assert_close(torch.tensor(saved["logprobs"]), values, atol=2e-4, rtol=0)
    with pytest.raises(BlspError, match="--save-topk"):
        ContinueOptions(save_topk=-1)


def test_auto_backend_runs_on_transformers_where_vllm_cannot_do_the_job(tmp_path, tiny_dirs, monkeypatch, capsys):
    """--save-topk needs the teacher's forward (transformers), and vLLM's outputs are fingerprinted
    by the checkpoint's safetensors files: `auto` picks hf for either, only `vllm` asked for refuses."""
    import sys

    import torch

    import blsp.continuation
    import blsp.fingerprint
    from blsp.continuation import choose_backend

    vllm = _fake_vllm(tiny_dirs["llm"])
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert choose_backend("auto") == "vllm" and choose_backend("auto", save_topk=5) == "hf"
    with pytest.raises(BlspError, match="--save-topk .* use --backend hf"):
        choose_backend("vllm", save_topk=5)

    def no_safetensors(path, *args):
        raise BlspError(f"{path}: no *.safetensors weights to fingerprint")

    monkeypatch.setattr(blsp.fingerprint, "checkpoint_fingerprint", no_safetensors)  # a hub id, .bin weights
    monkeypatch.setattr(blsp.continuation, "default_device", lambda info: torch.device("cpu"))  # no GPU here
    manifest = write_corpus(tmp_path / "data", n=2)
    common = dict(llm=tiny_dirs["llm"], max_new_tokens=4)
    auto = run_continue(manifest, tmp_path / "auto.jsonl", ContinueOptions(**common, backend="auto"))
    assert vllm.calls == [] and auto.written == 2
    err = capsys.readouterr().err
    assert "step 1: --backend auto: generating with transformers, not vLLM" in err and "no *.safetensors" in err
    hf = run_continue(manifest, tmp_path / "hf.jsonl", ContinueOptions(**common, backend="hf"))
    assert auto.fingerprint == hf.fingerprint
    with pytest.raises(BlspError, match="--backend vllm: cannot fingerprint"):
        run_continue(manifest, tmp_path / "vllm.jsonl", ContinueOptions(**common, backend="vllm"))


def test_sampling_on_vllm_seeds_each_utterance_apart(tmp_path, tiny_dirs, monkeypatch):
    """One transcript in several voices is sampled once per utterance: each request gets its own
    seed (one seed for all would give them all the same sample), the same on a re-run."""
    import sys
    import types

    import torch

    vllm = _fake_vllm(tiny_dirs["llm"])
    sent = []

    def generate(self, prompts, params, use_tqdm=True):
        sent.append(params)
        out = types.SimpleNamespace(text="a sample", finish_reason="stop")
        return [types.SimpleNamespace(outputs=[out]) for _ in prompts]

    monkeypatch.setattr(vllm.LLM, "generate", generate)
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    manifest = write_corpus(tmp_path / "data", n=2)
    rows = [json.loads(l) for l in manifest.read_text().splitlines()]
    rows += [{**r, "id": r["id"] + "_voice2"} for r in rows]  # the same transcripts, other utterances
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    opts = ContinueOptions(llm=tiny_dirs["llm"], max_new_tokens=4, do_sample=True, seed=3, backend="vllm")
    run_continue(manifest, tmp_path / "a.jsonl", opts)
    run_continue(manifest, tmp_path / "b.jsonl", opts)
    first, again = ([p.seed for p in params] for params in sent)
    assert len(first) == 4 and len(set(first)) == 4 and sorted(first) == sorted(again)
    assert all(p.temperature == 1.0 for p in sent[0])


def test_an_old_behaviour_file_as_input_leaves_no_stale_answers(tmp_path, llm):
    """Step 1's own fields of an input line (it may be an older behaviour file) are not carried
    into the output where this run does not write them; the manifest's own fields are."""
    manifest = write_corpus(tmp_path / "data", n=2)
    rows = [{**json.loads(l), "speaker": "slt", "responses": {"summarize": {"text": "old"}},
             "teacher_topk": {"k": 5}, "continuation": "old", "fingerprint": "old"}
            for l in manifest.read_text().splitlines()]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "behavior.jsonl"
    run_continue(manifest, out, ContinueOptions(max_new_tokens=4), model_and_tokenizer=llm)
    for rec in lines(out):
        assert "responses" not in rec and "teacher_topk" not in rec
        assert rec["speaker"] == "slt" and rec["continuation"] != "old" and rec["fingerprint"] != "old"


def test_the_drop_message_says_any_instructions_prompt_counts(tmp_path, llm, capsys):
    """With an instruction set an utterance goes when its prompt under any instruction is too long."""
    manifest = write_corpus(tmp_path / "data", n=1)
    continuer = Continuer(*llm, ContinueOptions())
    text = json.loads(manifest.read_text())["text"]
    limit = len(continuer.prompt_ids(text)) + 1  # the continuation's prompt fits
    long = "Answer with care " * 5 + "the question the following text raises."
    opts = ContinueOptions(max_new_tokens=4, max_prompt_tokens=limit, instruction_set=(("ask", long),))
    summary = run_continue(manifest, tmp_path / "b.jsonl", opts, model_and_tokenizer=llm)
    assert summary.dropped_long == ["u0"]
    assert "whose prompt under some instruction (of the continuation's and --instruction-set's) has >= " \
        f"{limit} tokens (--max-prompt-tokens)" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# An existing output is only changed once the run is known to be valid
# ----------------------------------------------------------------------------------------------
def unfinished(text: str, how: str) -> str:
    """The output as a killed writer leaves it (half a last line) or an editor (no final newline)."""
    return text[:-1] if how == "no final newline" else text[: text.rindex("\n", 0, len(text) - 1) + 16]


def continued_once(tmp_path, llm) -> tuple[Path, Path, ContinueOptions]:
    """A 3-utterance manifest, the output a first run wrote for it and that run's settings:
    what each test below damages or resumes."""
    manifest = write_corpus(tmp_path / "data", n=3)
    out = tmp_path / "behavior.jsonl"
    opts = ContinueOptions(max_new_tokens=4)
    run_continue(manifest, out, opts, model_and_tokenizer=llm)
    return manifest, out, opts


@pytest.mark.parametrize("how", ["half line", "no final newline"])
def test_a_refused_resume_leaves_an_unfinished_output_byte_identical(tmp_path, llm, how):
    manifest, out, _ = continued_once(tmp_path, llm)
    out.write_text(unfinished(out.read_text(), how))
    before = out.read_bytes()
    with pytest.raises(BlspError, match="other step-1 settings"):
        run_continue(manifest, out, ContinueOptions(max_new_tokens=5), model_and_tokenizer=llm)
    assert out.read_bytes() == before


def test_a_whole_last_line_without_its_newline_counts_as_done(tmp_path, llm):
    manifest, out, opts = continued_once(tmp_path, llm)
    full = out.read_bytes()
    out.write_bytes(full[:-1])
    summary = run_continue(manifest, out, opts, model_and_tokenizer=llm)
    assert (summary.already_done, summary.written) == (3, 0)
    assert out.read_bytes() == full


def test_rank_parts_with_other_settings_are_refused_before_any_merge(tmp_path, llm):
    manifest, out, opts = continued_once(tmp_path, llm)
    kept, *rest = out.read_text().splitlines(keepends=True)
    out.write_text(kept)
    stale = [json.dumps({**json.loads(line), "fingerprint": "another"}) + "\n" for line in rest]
    part = part_path(out, 1, 2)
    part.write_text("".join(stale))
    with pytest.raises(BlspError, match=f"^{part}:1: this output was written with other step-1 settings"):
        run_continue(manifest, out, opts, model_and_tokenizer=llm)
    assert out.read_text() == kept and part.read_text() == "".join(stale)


def test_the_manifest_as_its_own_output_is_refused(tmp_path, llm, monkeypatch):
    manifest = write_corpus(tmp_path / "data", n=2)
    manifest.write_bytes(manifest.read_bytes().rstrip(b"\n"))
    before = manifest.read_bytes()
    monkeypatch.chdir(tmp_path)
    for output in (manifest, "data/../data/manifest.jsonl"):  # the same file, however it is spelt
        with pytest.raises(BlspError, match=f"^{output}: --output is the manifest itself"):
            run_continue(manifest, output, ContinueOptions(max_new_tokens=4), model_and_tokenizer=llm)
    assert manifest.read_bytes() == before


def test_an_empty_manifest_is_refused(tmp_path, llm):
    manifest = tmp_path / "empty.jsonl"
    manifest.write_text("\n")
    with pytest.raises(BlspError, match=f"^{manifest}: no utterances: the manifest is empty$"):
        run_continue(manifest, tmp_path / "b.jsonl", ContinueOptions(max_new_tokens=4), model_and_tokenizer=llm)
    assert not (tmp_path / "b.jsonl").exists()


def test_voice_questions_answer_from_the_voices_description_and_keep_voices_apart(tmp_path, llm):
    from blsp.continuation import voice_response
    from blsp.voice import described_transcript, describe_voice, plain_answer, voice_questions

    manifest = write_corpus(tmp_path / "data", n=3)
    rows = [json.loads(l) for l in manifest.read_text().splitlines()]
    voices = [{"gender": "female", "whispered": "yes"}, {"gender": "male", "rate": "fast", "noisy": "no"}, {}]
    rows = [{**r, **v} for r, v in zip(rows, voices)]
    # the first transcript again in another voice: its continuation is shared, its voice answers are not
    rows.append({**rows[0], "id": "u0_male", "gender": "male", "whispered": "no"})
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    opts = ContinueOptions(max_new_tokens=5, batch_size=4, voice_questions=6)
    out = tmp_path / "behavior.jsonl"
    run_continue(manifest, out, opts, model_and_tokenizer=llm)
    records = {r["id"]: r for r in lines(out)}
    continuer = Continuer(*llm, opts)
    for rid, voice in (("u0", voices[0]), ("u1", voices[1]), ("u0_male", {"gender": "male", "whispered": "no"})):
        rec = records[rid]
        assert rec["voice_description"] == describe_voice(voice)
        heard = described_transcript(rec["prompt_transcript"], describe_voice(voice))
        assert set(rec["responses"]) == set(voice_questions(voice))
        for task, question in voice_questions(voice).items():
            text, truncated = continuer.continue_batch([continuer.prompt_ids(heard, question)])[0]
            response = rec["responses"][task]
            assert {k: response[k] for k in ("instruction", "heard")} == {"instruction": question, "heard": heard}
            # the tiny random LLM's answers are wrong: each is kept aside, the plain answer trains
            assert response["written_by"] == "plain" and response["llm_answer"] == [text, truncated]
            assert response["text"] == plain_answer(task, voice) and response["truncated"] is False
    assert "responses" not in records["u2"] and "voice_description" not in records["u2"]  # states no voice
    assert records["u0"]["continuation"] == records["u0_male"]["continuation"]
    assert opts.decoding()["voice_questions"] == 6  # another fingerprint than without
    right = voice_response("voice_gender", ("The speaker is female.", False), "hi", voices[0])
    assert right["written_by"] == "llm" and right["text"] == "The speaker is female." and "llm_answer" not in right
    cut = voice_response("voice_gender", ("The speaker is female and", True), "hi", voices[0])
    assert cut["written_by"] == "plain" and cut["text"] == "The speaker is female."
    again = run_continue(manifest, out, opts, model_and_tokenizer=llm)
    assert again.already_done == 4 and len(lines(out)) == 4


def test_a_line_is_asked_n_of_its_voice_questions_drawn_seeded():
    from blsp.continuation import asked_questions
    from blsp.voice import voice_questions

    voice = {"gender": "female", "rate": "fast", "whispered": "no"}
    assert asked_questions("hi", voice, 9, 0) == voice_questions(voice)
    one = asked_questions("hi", voice, 1, 0)
    assert len(one) == 1 and one == asked_questions("hi", voice, 1, 0)  # seeded
    drawn = {next(iter(asked_questions(f"line {i}", voice, 1, 0))) for i in range(40)}
    assert drawn == set(voice_questions(voice))  # every question gets asked somewhere
    assert asked_questions("hi", None, 3, 0) == {}
