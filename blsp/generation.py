"""`blsp generate`: one instruction over every clip of a manifest, batched and resumable."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from .data import check_output_apart, load_utterances_audio, read_jsonl, read_manifest
from .distributed import DistInfo, default_device
from .errors import BlspError
from .io import append_jsonl, repair_jsonl_tail
from .modeling import BlspModel


def done_ids(output: Path, instruction: str | None = None) -> set[str]:
    """Ids already answered in `output`, read without changing it: the caller repairs a killed
    writer's half line only once the run is known to be valid, so a refused run leaves the file
    as it was. Refuses a file that is not a `blsp generate` output (say, a manifest given as
    --output, whose last line may lack its newline), and answers to another instruction, so a
    changed instruction never silently reuses stale answers."""
    if not output.exists():
        return set()
    done = set()
    for line_no, rec in read_jsonl(output, partial_tail=True):
        if "prediction" not in rec:
            raise BlspError(f"{output}:{line_no}: not a `blsp generate` output (no `prediction`); write to another --output")
        if "id" not in rec:
            raise BlspError(f"{output}:{line_no}: not a `blsp generate` output (no `id`)")
        if instruction is not None and rec.get("instruction") != instruction:
            raise BlspError(f"{output}:{line_no}: this output holds answers to another instruction "
                            f"({rec.get('instruction')!r}); write to another --output, or delete it to start over")
        done.add(str(rec["id"]))
    return done


def run_generate(model_dir: str | Path, manifest: str | Path, output: str | Path, instruction: str,
                 batch_size: int = 8, max_new_tokens: int = 64, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, skip_bad: bool = False,
                 strict: bool = True, seed: int = 0, model: BlspModel | None = None,
                 generate_kwargs: dict | None = None) -> dict:
    """Writes `{"id", "audio", "text", "instruction", "prediction"}` per clip; skips ids already written.
    `generate_kwargs`: more of Hugging Face `generate`'s options (`blsp.inference.repetition_guard`).
    Everything that can refuse the run (the manifest, the output, the model) is checked before the
    output is first changed."""
    output = Path(output)
    check_output_apart(manifest, output)
    read = read_manifest(manifest, require_text=False, skip_bad=skip_bad)
    finished = done_ids(output, instruction)  # before loading the model: refuse a stale output fast
    if model is None:
        model = BlspModel.from_pretrained(model_dir, strict=strict)
        model.to(default_device(DistInfo()))
    output.parent.mkdir(parents=True, exist_ok=True)
    repair_jsonl_tail(output)  # keeps exactly the lines `done_ids` counted
    todo = [u for u in read.utterances if u.id not in finished]
    torch.manual_seed(seed)
    skipped, written = list(read.skipped), 0
    with tqdm(total=len(todo), desc="generating", unit="utt") as bar:
        for start in range(0, len(todo), batch_size):
            loaded, failed = load_utterances_audio(todo[start : start + batch_size], skip_bad)
            skipped += failed
            batch, audio = [u for u, _ in loaded], [wav for _, wav in loaded]
            bar.update(len(todo[start : start + batch_size]))
            if not batch:
                continue
            answers = model.generate(
                audio=audio, instruction=instruction, max_new_tokens=max_new_tokens,
                do_sample=do_sample, temperature=temperature, top_p=top_p, **(generate_kwargs or {}),
            )
            append_jsonl(output, [
                {**u.extra, "id": u.id, "audio": u.audio.relative_to(output.parent),
                 "text": u.text, "instruction": instruction, "prediction": a}
                for u, a in zip(batch, answers)
            ])
            written += len(batch)
    return {"written": written, "already_done": len(finished),
            "skipped_bad": [str(e) for e in skipped]}
