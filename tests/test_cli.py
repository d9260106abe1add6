"""The `blsp` command end to end on tiny models: one-line errors naming the bad line (exit 2, no
traceback, outputs untouched), --skip-bad, resampling, continue -> train -> generate with resume,
chat over stdin, the model list and every --help."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

import blsp.packaged
import blsp.trainer
from blsp.cli import build_parser, main
from blsp.prompts import task_instruction
from blsp.options import TrainOptions

from conftest import tone, write_corpus

MANIFEST_GOOD = 4
CONTINUE = ["--max-new-tokens", "6", "--batch-size", "4"]


pytestmark = pytest.mark.usefixtures("private_cache")  # nothing here writes to ~/.cache/blsp


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error_lines(err: str) -> list[str]:
    """stderr without tqdm's progress bars."""
    return [l for l in err.replace("\r", "\n").splitlines() if l.strip() and "it/s]" not in l and "utt/s]" not in l]


def read_ids(path: Path) -> list[str]:
    return [json.loads(l)["id"] for l in path.read_text().splitlines() if l.strip()]


# ----------------------------------------------------------------------------------------------
# Bad manifest lines
# ----------------------------------------------------------------------------------------------
def bad_line(kind: str, root: Path) -> tuple[str, str]:
    """(manifest line, words the error must contain) for one kind of bad line."""
    wav = root / "wav"
    if kind == "zero_length":
        sf.write(wav / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    if kind == "corrupt":
        (wav / "corrupt.wav").write_bytes(np.random.default_rng(0).bytes(4000))
    if kind == "directory":
        (wav / "folder").mkdir(exist_ok=True)
    if kind == "nan_samples":
        samples = tone(0.5)
        samples[100] = np.nan
        sf.write(wav / "nan.wav", samples, 16000, subtype="FLOAT")
    return {
        "not_json": ('{"id": "bad", "audio": "wav/u0.wav", "text": ', "not valid JSON"),
        "no_audio": (json.dumps({"id": "bad", "text": "hello world"}), "missing `audio`"),
        "no_text": (json.dumps({"id": "bad", "audio": "wav/u0.wav"}), "missing or empty `text`"),
        "empty_text": (json.dumps({"id": "bad", "audio": "wav/u0.wav", "text": "  "}), "missing or empty `text`"),
        "missing_file": (json.dumps({"id": "bad", "audio": "wav/nope.wav", "text": "hello"}), "not found"),
        "zero_length": (json.dumps({"id": "bad", "audio": "wav/empty.wav", "text": "hello"}), "no audio samples"),
        "corrupt": (json.dumps({"id": "bad", "audio": "wav/corrupt.wav", "text": "hello"}), "cannot read audio"),
        "directory": (json.dumps({"id": "bad", "audio": "wav/folder", "text": "hello"}),
                      "audio path is a directory, not a file"),
        "nan_samples": (json.dumps({"id": "bad", "audio": "wav/nan.wav", "text": "hello"}),
                        "audio contains NaN or infinite samples"),
    }[kind]


BAD_KINDS = ["not_json", "no_audio", "no_text", "empty_text", "missing_file", "zero_length", "corrupt", "directory",
             "nan_samples"]


@pytest.fixture(scope="module")
def continued(tiny_dirs, tmp_path_factory):
    """A good manifest and the output `blsp continue` wrote for it."""
    root = tmp_path_factory.mktemp("continued")
    manifest = write_corpus(root, n=MANIFEST_GOOD)
    out = root / "behavior.jsonl"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(blsp.packaged, "CACHE_DIR", root / "cache")
        assert main(["continue", "--manifest", str(manifest), "--output", str(out), "--llm", tiny_dirs["llm"],
                     *CONTINUE]) == 0
    assert sorted(read_ids(out)) == [f"u{i}" for i in range(MANIFEST_GOOD)]
    return root


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_continue_names_the_bad_line_and_leaves_the_output_alone(kind, continued, tiny_dirs, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(continued, root)
    manifest, out = root / "manifest.jsonl", root / "behavior.jsonl"
    before = out.read_bytes()
    good = manifest.read_text().splitlines()
    line, words = bad_line(kind, root)
    # line 3 is blank: line numbers count the file's physical lines
    manifest.write_text("\n".join(good[:2] + ["", line] + good[2:]) + "\n")
    code, stdout, err = run(capsys, "continue", "--manifest", manifest, "--output", out, "--llm", tiny_dirs["llm"],
                            *CONTINUE)
    assert code == 2
    assert "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith(f"blsp: error: {manifest}:4: "), lines[0]
    assert words in lines[0]
    assert out.read_bytes() == before
    assert stdout == ""


def test_skip_bad_skips_and_reports_every_bad_line(tmp_path, tiny_dirs, capsys):
    root = tmp_path / "data"
    manifest = write_corpus(root, n=3)
    good = manifest.read_text().splitlines()
    lines, bad_numbers = list(good), []
    for k, kind in enumerate(BAD_KINDS):
        line, _ = bad_line(kind, root)
        lines.append(line.replace('"bad"', f'"bad{k}"'))
        bad_numbers.append(len(lines))
    lines.append(json.dumps({"id": "last", "audio": "wav/u1.wav", "text": "hello world"}))
    manifest.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out" / "behavior.jsonl"
    code, stdout, err = run(capsys, "continue", "--manifest", manifest, "--output", out, "--llm", tiny_dirs["llm"],
                            "--skip-bad", *CONTINUE)
    assert code == 0, err
    assert "Traceback" not in err
    assert sorted(read_ids(out)) == sorted(["u0", "u1", "u2", "last"])
    assert f"skipped {len(BAD_KINDS)} bad line(s)" in err
    reported = [l.strip() for l in error_lines(err) if l.startswith("  ")]
    assert [l.split(":")[1] for l in reported] == [str(n) for n in bad_numbers]
    assert all(l.startswith(f"{manifest}:") for l in reported)
    assert "wrote 4 continuation(s)" in stdout


def test_a_user_error_in_a_subprocess_exits_2_without_a_traceback(tmp_path, tiny_dirs):
    root = tmp_path / "data"
    manifest = write_corpus(root, n=2)
    manifest.write_text(manifest.read_text() + '{"audio": "wav/u0.wav"}\n')
    env = {**os.environ, "BLSP_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "blsp.cli", "continue", "--manifest", str(manifest), "--output",
         str(tmp_path / "o.jsonl"), "--llm", tiny_dirs["llm"]],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"blsp: error: {manifest}:3: missing or empty `text`"
    assert not (tmp_path / "o.jsonl").exists()


# ----------------------------------------------------------------------------------------------
# continue -> train -> generate
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tiny_dirs, tmp_path_factory):
    """Step 1 and 2 through the CLI on a corpus with a stereo 44.1 kHz and an 8 kHz clip."""
    root = tmp_path_factory.mktemp("pipeline")
    manifest = write_corpus(root / "data", n=3)
    stereo = np.stack([tone(1.5, 440, sr=44100), tone(1.5, 660, sr=44100)], axis=1)
    sf.write(root / "data" / "wav" / "stereo.wav", stereo, 44100)
    sf.write(root / "data" / "wav" / "narrow.wav", tone(1.2, 300, sr=8000), 8000)
    with open(manifest, "a") as f:
        f.write(json.dumps({"id": "stereo", "audio": "wav/stereo.wav", "text": "hello world"}) + "\n")
        f.write(json.dumps({"id": "narrow", "audio": "wav/narrow.wav", "text": "the quick brown fox"}) + "\n")
    behavior = root / "behavior.jsonl"
    model_dir = root / "adapter"
    features = root / "features"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(blsp.packaged, "CACHE_DIR", root / "cache")
        mp.setattr(blsp.trainer, "CACHE_DIR", root / "cache")
        assert main(["continue", "--manifest", str(manifest), "--output", str(behavior),
                     "--llm", tiny_dirs["llm"], *CONTINUE]) == 0
        assert main(["train", "--data", str(behavior), "--encoder", tiny_dirs["encoder"], "--llm", tiny_dirs["llm"],
                     "--output-dir", str(model_dir), "--max-steps", "2", "--batch-size", "2", "--warmup-steps", "1",
                     "--feature-cache", str(features), "--preset", "paper"]) == 0
    assert not (root / "cache").exists()
    return {"manifest": manifest, "behavior": behavior, "model": model_dir, "features": features,
            "ids": ["u0", "u1", "u2", "stereo", "narrow"]}


def test_stereo_44k_and_8k_audio_are_resampled_not_refused(trained):
    from blsp.audio import AudioRef
    from blsp.data import read_manifest
    from blsp.features import FeatureCache
    from blsp.config import BlspConfig

    assert sorted(read_ids(trained["behavior"])) == sorted(trained["ids"])
    fingerprint = BlspConfig.from_pretrained(trained["model"]).encoder_fingerprint
    cache = FeatureCache(trained["features"], fingerprint)
    utts = {u.id: u for u in read_manifest(trained["behavior"]).utterances}
    assert len(list(Path(trained["features"]).rglob("*.npy"))) == len(trained["ids"])
    # 50 encoder frames a second of audio, whatever the file's rate and channels
    assert cache.load(utts["stereo"].audio).shape[0] == 75
    assert cache.load(utts["narrow"].audio).shape[0] == 60
    assert cache.load(AudioRef(utts["u0"].audio.path)).shape[0] == 30  # 0.6 s


def test_train_writes_a_loadable_adapter_and_refuses_to_overwrite(trained, tiny_dirs, capsys):
    model_dir = trained["model"]
    log = [json.loads(l) for l in (model_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2] and all(np.isfinite(r["loss"]) for r in log)
    assert (model_dir / "adapter.safetensors").exists()
    before = (model_dir / "adapter.safetensors").read_bytes()
    code, _, err = run(capsys, "train", "--data", trained["behavior"], "--encoder", tiny_dirs["encoder"],
                       "--llm", tiny_dirs["llm"], "--output-dir", model_dir, "--max-steps", "2",
                       "--batch-size", "2", "--feature-cache", trained["features"], "--preset", "paper")
    assert code == 2
    lines = error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith("blsp: error: ") and "already holds checkpoints" in lines[0] and "--resume" in lines[0]
    assert (model_dir / "adapter.safetensors").read_bytes() == before


def test_train_defaults_to_the_decoder_recipe_and_flags_given_win(trained, tiny_dirs, tiny_whisper_dir, tmp_path,
                                                                   capsys):
    from blsp.options import PRESETS as RECIPES

    def parsed(*extra):
        from blsp.options import options_from_args as train_options

        return train_options(build_parser().parse_args(["train", "--data", "d", "--output-dir", "o", *extra]))

    default, fast, paper = parsed(), parsed("--preset", "fast"), parsed("--preset", "paper")
    assert {k: default.flat()[k] for k in RECIPES["decoder"]} == RECIPES["decoder"]
    assert {k: fast.flat()[k] for k in RECIPES["fast"]} == RECIPES["fast"]
    assert paper == TrainOptions()  # the paper's recipe is the dataclass's own defaults
    assert parsed("--lora-rank", "0").lora.rank == 0  # a flag given wins, even at a default's value
    assert parsed("--preset", "paper", "--lora-rank", "4").lora.rank == 4

    common = ["train", "--data", trained["behavior"], "--llm", tiny_dirs["llm"], "--max-steps", "2", "--batch-size", "2"]
    out = tmp_path / "default"  # the default recipe end to end: Whisper's decoder states, the bridge, KL, no LoRA
    code, _, err = run(capsys, *common, "--encoder", tiny_whisper_dir, "--output-dir", out,
                       "--feature-cache", tmp_path / "decoder-states")
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert (config["speech_states"], config["speech_vectors"], config["adapter_type"], config["adapter_downsample"]) == (
        "decoder", "tokens", "stack", 1)
    assert config["lora"] is None and default.objective.loss == "kl"

    out = tmp_path / "fast"  # the encoder path's recipe end to end, with a short warm start
    code, _, err = run(capsys, *common, "--encoder", tiny_dirs["encoder"], "--preset", "fast", "--output-dir", out,
                       "--warm-start-steps", "3",
                       "--feature-cache", trained["features"])
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["lora"]["rank"] == 8 and config["adapter_downsample"] == 4 and config["speech_compression"] == "ctc"
    assert config["speech_states"] == "encoder"


@pytest.mark.parametrize("how", ["task", "instruction"])
def test_generate_writes_one_prediction_per_utterance_and_resumes(how, trained, tmp_path, capsys):
    from blsp.modeling import BlspModel

    out = tmp_path / "pred.jsonl"
    if how == "task":
        what, instruction = ["--task", "transcribe"], task_instruction("transcribe")
    else:
        instruction = "Describe the sound in one word."
        what = ["--instruction", instruction]
    args = ["generate", "--model", trained["model"], "--manifest", trained["manifest"], "--output", out,
            "--max-new-tokens", "5", "--batch-size", "2", *what]
    code, stdout, err = run(capsys, *args)
    assert code == 0, err
    assert "wrote 5 answer(s)" in stdout
    records = [json.loads(l) for l in out.read_text().splitlines()]
    assert sorted(r["id"] for r in records) == sorted(trained["ids"])
    assert all(r["instruction"] == instruction and isinstance(r["prediction"], str) for r in records)
    assert all((out.parent / r["audio"]).exists() for r in records)

    # the CLI's answers are the model's, batch by batch or one by one
    model = BlspModel.from_pretrained(trained["model"])
    by_id = {r["id"]: r for r in records}
    for rid in ("u0", "stereo", "narrow"):
        audio = out.parent / by_id[rid]["audio"]
        assert model.generate(audio=str(audio), instruction=instruction, max_new_tokens=5) == [by_id[rid]["prediction"]]

    before = out.read_bytes()
    code, stdout, _ = run(capsys, *args)
    assert code == 0 and "wrote 0 answer(s)" in stdout and "(5 already there)" in stdout
    assert out.read_bytes() == before


def test_generate_refuses_stale_or_foreign_outputs(trained, tmp_path, capsys):
    out = tmp_path / "pred.jsonl"
    common = ["generate", "--model", trained["model"], "--manifest", trained["manifest"], "--max-new-tokens", "3"]
    assert run(capsys, *common, "--output", out, "--task", "transcribe")[0] == 0
    before = out.read_bytes()
    # another instruction into the same output: answers to the old one must not count as done
    code, _, err = run(capsys, *common, "--output", out, "--task", "emotion")
    assert code == 2 and out.read_bytes() == before
    assert error_lines(err)[0].startswith(f"blsp: error: {out}:1: this output holds answers to another instruction")
    # a manifest given as --output (without a final newline): refused, not truncated or appended to
    manifest = trained["manifest"]
    copy = tmp_path / "manifest.jsonl"
    copy.write_bytes(manifest.read_bytes().rstrip(b"\n"))
    before = copy.read_bytes()
    code, _, err = run(capsys, *common, "--output", copy)
    assert code == 2 and copy.read_bytes() == before
    assert error_lines(err) == [f"blsp: error: {copy}:1: not a `blsp generate` output (no `prediction`); "
                                "write to another --output"]
    # the manifest itself as --output: refused before anything is read from it as an output
    shutil.copytree(manifest.parent / "wav", tmp_path / "wav")
    code, _, err = run(capsys, *common[:-4], "--manifest", copy, "--output", copy, "--max-new-tokens", "3")
    assert code == 2 and copy.read_bytes() == before
    assert error_lines(err) == [f"blsp: error: {copy}: --output is the manifest itself; write to another file"]


def one_line_manifest(root: Path) -> Path:
    """The issue's file: one manifest line, no final newline (as `printf` writes it)."""
    sf.write(root / "a.wav", tone(0.5), 16000)
    path = root / "f.jsonl"
    path.write_bytes(b'{"audio":"a.wav","text":"x"}')
    return path


def test_a_refused_generate_leaves_the_output_byte_identical(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    manifest = one_line_manifest(tmp_path)
    before = manifest.read_bytes()
    # the manifest as its own output, a model that is not there: refused, the file as it was
    code, _, err = run(capsys, "generate", "--model", "nonexistent", "--manifest", "f.jsonl", "--task", "transcribe",
                       "--output", "f.jsonl")
    assert code == 2 and manifest.read_bytes() == before
    assert error_lines(err) == ["blsp: error: f.jsonl: --output is the manifest itself; write to another file"]
    # a copy as --output: refused as no generate output, before the model is even looked for
    output = tmp_path / "g.jsonl"
    output.write_bytes(before)
    code, _, err = run(capsys, "generate", "--model", "nonexistent", "--manifest", manifest, "--output", output)
    assert code == 2 and output.read_bytes() == before
    assert error_lines(err) == [f"blsp: error: {output}:1: not a `blsp generate` output (no `prediction`); "
                                "write to another --output"]
    # a real output with a killed writer's half line, and a model that is not there: the half line
    # stays until a run that can write has started
    answered = json.dumps({"id": "other", "instruction": task_instruction("transcribe"), "prediction": "x"})
    output.write_text(answered + '\n{"id": "f.jsonl", "instr')
    before = output.read_bytes()
    code, _, err = run(capsys, "generate", "--model", "nonexistent", "--manifest", manifest, "--output", output)
    assert code == 2 and output.read_bytes() == before
    assert error_lines(err) == ["blsp: error: nonexistent: not a blsp checkpoint (no adapter.safetensors)"]
    code, _, err = run(capsys, "generate", "--model", trained["model"], "--manifest", manifest, "--output", output,
                       "--max-new-tokens", "3")
    assert code == 0, err
    assert read_ids(output) == ["other", "a.wav"]


@pytest.mark.parametrize("how", ["half line", "no final newline"])
def test_generate_refuses_another_instruction_before_repairing_the_last_line(how, trained, tmp_path, capsys):
    out = tmp_path / "pred.jsonl"
    common = ["generate", "--model", trained["model"], "--manifest", trained["manifest"], "--max-new-tokens", "3",
              "--output", out]
    assert run(capsys, *common, "--task", "transcribe")[0] == 0
    text = out.read_text()
    out.write_text(text[:-1] if how == "no final newline" else text[: text.rindex("\n", 0, len(text) - 1) + 16])
    before = out.read_bytes()
    code, _, err = run(capsys, *common, "--task", "emotion")
    assert code == 2 and out.read_bytes() == before
    assert "this output holds answers to another instruction" in error_lines(err)[0]
    # the same instruction resumes: a half line is answered again, a whole one counts as done
    code, stdout, err = run(capsys, *common, "--task", "transcribe")
    assert code == 0, err
    assert ("wrote 1 answer(s)" if how == "half line" else "wrote 0 answer(s)") in stdout
    assert sorted(read_ids(out)) == sorted(trained["ids"]) and out.read_text().endswith("\n")


@pytest.mark.parametrize("command", ["generate", "continue"])
def test_an_empty_manifest_is_a_one_line_error(command, trained, tiny_dirs, tmp_path, capsys):
    manifest = tmp_path / "empty.jsonl"
    manifest.write_text("")
    out = tmp_path / "out.jsonl"
    model = ["--model", trained["model"]] if command == "generate" else ["--llm", tiny_dirs["llm"]]
    code, stdout, err = run(capsys, command, "--manifest", manifest, "--output", out, *model)
    assert code == 2 and stdout == "" and "Traceback" not in err
    assert error_lines(err) == [f"blsp: error: {manifest}: no utterances: the manifest is empty"]
    assert not out.exists()


def test_generate_sampling_is_reproducible_with_a_seed(trained, tmp_path, capsys):
    def sample(name, seed):
        out = tmp_path / name
        code, _, err = run(capsys, "generate", "--model", trained["model"], "--manifest", trained["manifest"],
                           "--output", out, "--max-new-tokens", "8", "--sample", "--temperature", "2.0",
                           "--seed", seed)
        assert code == 0, err
        return {json.loads(l)["id"]: json.loads(l)["prediction"] for l in out.read_text().splitlines()}

    first = sample("a.jsonl", 7)
    assert sample("b.jsonl", 7) == first
    assert sample("c.jsonl", 8) != first


def test_generate_without_an_adapter_is_a_clear_error(trained, tmp_path, capsys):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    code, _, err = run(capsys, "generate", "--model", empty, "--manifest", trained["manifest"],
                       "--output", tmp_path / "p.jsonl")
    assert code == 2 and "Traceback" not in err
    assert error_lines(err) == [f"blsp: error: {empty}: not a blsp checkpoint (no adapter.safetensors)"]
    assert not (tmp_path / "p.jsonl").exists()


# ----------------------------------------------------------------------------------------------
# chat
# ----------------------------------------------------------------------------------------------
def test_chat_over_stdin(trained, tmp_path, monkeypatch, capsys):
    wav = trained["manifest"].parent / "wav" / "u1.wav"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"hello\n/audio {wav} what is this\n/audio missing.wav\n/quit\n"
                                                  "never read\n"))
    code, out, err = run(capsys, "chat", "--model", trained["model"], "--max-new-tokens", "5")
    assert code == 0
    assert "Traceback" not in err
    replies = [l for l in out.splitlines() if l.startswith("assistant: ")]
    assert len(replies) == 2, out
    errors = [l for l in error_lines(err) if l.startswith("error: ")]
    assert len(errors) == 1 and "missing.wav" in errors[0] and "not found" in errors[0]


# ----------------------------------------------------------------------------------------------
# models and help
# ----------------------------------------------------------------------------------------------
def test_models_json_lists_the_packaged_models(capsys):
    code, out, _ = run(capsys, "models", "--json")
    assert code == 0
    rows = json.loads(out)
    assert {"whisper-base", "whisper-tiny.en", "smollm2-135m-instruct", "gemma3-270m"} <= {r["name"] for r in rows}
    kinds = {r["name"]: r["kind"] for r in rows}
    assert kinds["whisper-base"] == "encoder" and kinds["smollm2-135m-instruct"] == kinds["gemma3-270m"] == "llm"
    assert all(isinstance(r["installed"], bool) and isinstance(r["cached"], bool) for r in rows)


@pytest.mark.parametrize("command", [[], ["continue"], ["train"], ["generate"], ["chat"], ["models"]])
def test_help_exits_0(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: blsp {command[0] if command else ''}".rstrip())


def test_option_flags_turn_recipe_options_into_command_flags():
    from blsp.options import option_flags

    # A switch that is on by default is turned off by its --no- flag, not by leaving it out.
    assert option_flags({"bucket_by_length": False, "drop_copies": False}) == ["--no-bucket-by-length"]
    assert option_flags({"warm_start_bucket_by_length": False}) == ["--no-warm-start-bucket-by-length"]
    assert build_parser().parse_args(["train", "--data", "d", "--output-dir", "o",
                                      *option_flags({"bucket_by_length": False})]).bucket_by_length is False

    assert option_flags({"max_steps": 200, "drop_copies": True, "resume": False, "system_prompt": "", "x": None}) == [
        "--max-steps", "200", "--drop-copies", "--system-prompt", ""]


def test_train_errors_blame_the_default_recipe_not_flags_the_user_never_typed(tiny_dirs, tiny_whisper_dir, tmp_path,
                                                                             capsys):
    from blsp.shards import ShardWriteOptions, write_shards

    data = write_corpus(tmp_path / "data", n=2, with_continuation=True)
    code, _, err = run(capsys, "train", "--data", data, "--output-dir", tmp_path / "run", "--fsdp", "--preset", "fast")
    assert code == 2
    assert error_lines(err) == ["blsp: error: --lora-rank with --fsdp is not supported: the sharded LLM must stay "
                                "frozen (--lora-rank 8 set by --preset fast, not by a flag: pass --preset paper, or "
                                "--lora-rank 0)"]
    # a flag of the encoder path, typed, against the default recipe's decoder states
    code, _, err = run(capsys, "train", "--data", data, "--output-dir", tmp_path / "run", "--warm-start", "ctc")
    assert code == 2
    assert error_lines(err) == ["blsp: error: --warm-start ctc: not with --speech-states decoder (one state per token "
                                "of Whisper's transcript); use --warm-start none (--speech-states decoder set by "
                                "--preset decoder, not by a flag: pass --preset paper, or --speech-states encoder)"]
    code, _, err = run(capsys, "train", "--data", data, "--output-dir", tmp_path / "run", "--adapter", "conv")
    assert code == 2
    (line,) = error_lines(err)
    assert "use --adapter stack --adapter-downsample 1, not --adapter conv" in line
    assert line.endswith("set by --preset decoder, not by a flag: pass --preset paper, or --speech-states encoder "
                         "--speech-vectors adapter)")

    write_shards([data], tmp_path / "shards", ShardWriteOptions(shard_size=1))
    code, _, err = run(capsys, "train", "--data", tmp_path / "shards", "--output-dir", tmp_path / "run",
                       "--preset", "fast")
    assert code == 2
    (line,) = error_lines(err)
    assert line.startswith("blsp: error: --warm-start and --compress-speech need every clip's features")
    assert line.endswith("(--warm-start ctc --compress-speech ctc set by --preset fast, not by a flag: pass "
                         "--preset paper, or --warm-start none --compress-speech none)")
    # an encoder saved without Whisper's tokenizer cannot give decoder states: the recipe asked for them
    code, _, err = run(capsys, "train", "--data", tmp_path / "shards", "--output-dir", tmp_path / "streamed",
                       "--encoder", tiny_dirs["encoder"], "--llm", tiny_dirs["llm"])
    assert code == 2
    (line,) = error_lines(err)
    assert "need Whisper's tokenizer beside" in line and line.endswith(
        "(--speech-states decoder set by --preset decoder, not by a flag: pass --preset paper, or --speech-states encoder)")
    # the default recipe streams shards of audio: Whisper decodes each clip as it comes
    code, _, err = run(capsys, "train", "--data", tmp_path / "shards", "--output-dir", tmp_path / "streamed",
                       "--encoder", tiny_whisper_dir, "--llm", tiny_dirs["llm"], "--max-steps", "1",
                       "--batch-size", "2")
    assert code == 0, err
    assert json.loads((tmp_path / "streamed" / "config.json").read_text())["speech_states"] == "decoder"
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "--fsdp --preset paper" in " ".join(capsys.readouterr().out.split())  # the help's scale example
