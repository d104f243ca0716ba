"""charlm-generate's options are checked in one place (``SampleOptions``), all of them before the checkpoint is
read, and a bad one is one line naming it."""

from __future__ import annotations

import re
from dataclasses import fields

import pytest

from charlm import UserError
from charlm.config import compose
from charlm.infer.options import SampleOptions, ScoreOptions
from tests.conftest import assert_user_error, compose_generate, run_cli

BAD = [
    ({"seed": "abc"}, "seed='abc' must be a whole number"),
    ({"length": -1}, "length=-1 must be a whole number >= 0"),
    ({"num_samples": 0}, "num_samples=0 must be a whole number >= 1"),
    ({"format": "xml"}, "format='xml' is not known; use one of text, jsonl"),
    ({"device": "tpu"}, "device=tpu is not a device"),
    ({"unknown": "maybe"}, "unknown='maybe' is not known; use one of error, unk, skip"),
    ({"impl": "magic"}, "impl='magic' is not known; use one of fused, parallel, scratch"),
    ({"quantize": "int4"}, "quantize='int4' is not known; use one of none, int8"),
    ({"threads": 0}, "threads=0 must be a whole number >= 1"),
    ({"beam": -1}, "beam=-1 must be a whole number >= 0"),
    ({"beam": 2, "num_samples": 3}, "num_samples=3 but beam=2 keeps only 2"),
    ({"beam": 2, "length_penalty": "long"}, "length_penalty='long' must be a number"),
    ({"temperature": -1}, "temperature=-1 must be"),
    ({"top_p": 0}, "top_p=0 must be in (0, 1]"),
    ({"stop": ""}, "stop='' must be non-empty text"),
    ({"prompt": "a", "prompt_file": "p.txt"}, "prompt and prompt_file are both given"),
]


@pytest.mark.parametrize(("options", "match"), BAD, ids=[next(iter(o)) + str(i) for i, (o, _) in enumerate(BAD)])
def test_each_bad_option_is_refused_before_the_checkpoint_is_read(tmp_path, options, match):
    garbage = tmp_path / "not_a.ckpt"  # reading it would be refused with another error
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="^" + re.escape(match)):
        SampleOptions(ckpt=str(garbage), **options)


def test_the_options_are_the_settings_of_the_generate_config():
    """Every setting generate.py reads is a field of SampleOptions (so none escapes its checks), and back."""
    cfg = compose_generate(["ckpt=x.ckpt"])
    assert {f.name for f in fields(SampleOptions)} == set(cfg)
    opts = SampleOptions.from_config(cfg)
    assert (opts.length, opts.temperature, opts.settings.temperature) == (cfg.length, cfg.temperature, cfg.temperature)


def test_stop_reads_escapes_as_the_command_line_types_them(tmp_path):
    (tmp_path / "m.ckpt").write_bytes(b"")
    opts = SampleOptions(ckpt=str(tmp_path / "m.ckpt"), stop="\\n\\n", prompt="a\\tb")
    assert opts.settings.stop == "\n\n" and opts.read_prompt() == "a\tb"


def test_a_seed_that_is_no_number_is_one_line_from_generate_py(tiny_run):
    """Before SampleOptions: torch's 'manual_seed expected a long' RuntimeError, as a traceback, after the
    checkpoint was loaded."""
    proc = run_cli("generate.py", f"ckpt={tiny_run.out}/checkpoints/best.ckpt", "seed=abc")
    assert_user_error(proc, "seed='abc' must be a whole number")


SCORE_BAD = [
    ({"format": "csv"}, "format='csv' is not known; use one of summary, jsonl"),
    ({"unknown": "drop"}, "unknown='drop' is not known; use one of error, unk, skip"),
    ({"top": -1}, "top=-1 must be a whole number >= 0"),
    ({"streams": 0}, "streams=0 must be a whole number >= 1"),
    ({"chunk": 0}, "chunk=0 must be a whole number >= 1"),
    ({"device": "cuda:x"}, "device=cuda:x is not a device"),
    ({"file": "a.txt", "text": "abc"}, "file and text are both given"),
]


@pytest.mark.parametrize(("options", "match"), SCORE_BAD, ids=[next(iter(o)) for o, _ in SCORE_BAD])
def test_each_bad_score_option_is_refused_before_the_checkpoint_is_read(tmp_path, options, match):
    """Before ScoreOptions, unknown=, top= and chunk= were refused only once the checkpoint was loaded."""
    garbage = tmp_path / "not_a.ckpt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="^" + re.escape(match)):
        ScoreOptions(ckpt=str(garbage), **options)


def test_the_score_options_are_the_settings_of_the_score_config():
    cfg = compose(["ckpt=x.ckpt"], config_name="score")
    assert {f.name for f in fields(ScoreOptions)} == set(cfg)
    assert ScoreOptions.from_config(cfg).prompt == "" and ScoreOptions(ckpt="x.ckpt", prompt="a\\nb").prompt == "a\nb"
