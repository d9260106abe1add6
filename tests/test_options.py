"""Step 2's options (blsp.options): sections and flat names, presets from YAML files, flags from fields."""

from __future__ import annotations

import pytest

from blsp.cli import build_parser
from blsp.errors import BlspError
from blsp.options import DEFAULTS, FLAT_FIELDS, PRESETS, TrainOptions, options_from_args


def parse(*flags: str) -> TrainOptions:
    return options_from_args(build_parser().parse_args(["train", "--data", "d", "--output-dir", "o", *flags]))


def test_flat_names_and_sections_round_trip():
    options = TrainOptions.from_preset("fast", lr=3e-4, lora_rank=4, warm_start_data=["more.jsonl"])
    assert (options.optim.lr, options.lora.rank, options.warm_start.method) == (3e-4, 4, "ctc")
    assert options.warm_start.data == ("more.jsonl",)
    assert TrainOptions.from_flat(**options.flat()) == options
    assert set(options.flat()) == set(FLAT_FIELDS) == set(DEFAULTS)


def test_every_option_has_its_flag_with_the_fields_default():
    args = build_parser().parse_args(["train", "--data", "d", "--output-dir", "o", "--preset", "paper"])
    for name, default in DEFAULTS.items():
        assert hasattr(args, name), name
        preset_sets = any(name in values for values in PRESETS.values())
        assert getattr(args, name) == (None if preset_sets else default), name
    assert parse("--preset", "paper") == TrainOptions()


def test_a_users_preset_file_is_read_and_flags_win_over_it(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("lora_rank: 2\nlora_modules: mlp\nmix_transcribe: 0.1\n")
    options = parse("--preset", str(mine), "--lora-rank", "4")
    assert (options.lora.rank, options.lora.modules, options.objective.mix_transcribe) == (4, "mlp", 0.1)
    assert options.by_preset("lora_modules") and not options.by_preset("lora_rank")


def test_a_flag_turns_off_a_switch_the_preset_turns_on():
    from blsp.options import option_flags

    assert parse("--preset", "decoder").model.bridge_transcript is True
    assert parse("--preset", "decoder", "--no-bridge-transcript").model.bridge_transcript is False
    # recipes write their settings as flags: False must reach the command line, not vanish
    assert option_flags({"bridge_transcript": False, "max_steps": 3}) == ["--no-bridge-transcript", "--max-steps", "3"]


def test_bad_presets_are_refused_naming_the_file(tmp_path):
    typo = tmp_path / "typo.yaml"
    typo.write_text("lora_rnk: 4\n")
    with pytest.raises(BlspError, match=r"typo.yaml: unknown option\(s\) lora_rnk"):
        parse("--preset", str(typo))
    with pytest.raises(BlspError, match="unknown preset 'bogus'; choose from decoder, fast, paper"):
        parse("--preset", "bogus")
    with pytest.raises(BlspError, match="preset file not found"):
        parse("--preset", str(tmp_path / "missing.yaml"))
    with pytest.raises(BlspError, match=r"unknown option\(s\) lr_rate"):
        TrainOptions.from_flat(lr_rate=1.0)


def test_a_bridge_confidence_needs_the_token_bridge_and_a_posterior():
    from blsp.options import check_options

    with pytest.raises(BlspError, match="only the token bridge reads sure tokens"):
        check_options(parse("--preset", "paper", "--bridge-confidence", "0.5"))
    with pytest.raises(BlspError, match="between 0 and 1"):
        check_options(parse("--preset", "decoder", "--bridge-confidence", "2"))
    check_options(parse("--preset", "decoder", "--bridge-confidence", "0.5"))


def test_a_correction_penalty_needs_the_token_bridge_and_a_weight_of_zero_or_more():
    from blsp.options import check_options

    with pytest.raises(BlspError, match="only the token bridge's adapter makes a correction"):
        check_options(parse("--preset", "paper", "--correction-weight", "1"))
    with pytest.raises(BlspError, match="--correction-weight -1.0: 0"):
        check_options(parse("--preset", "decoder", "--correction-weight", "-1"))
    check_options(parse("--preset", "decoder", "--correction-weight", "1"))
