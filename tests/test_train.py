"""The real train() and sample() entry points (charlm.cli), end to end, on a tiny corpus and model."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import re
import warnings
from dataclasses import fields
from datetime import date
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.custom_scalar.layout_pb2 import Layout
from tensorboard.plugins.hparams import api_pb2 as hp_api
from tensorboard.plugins.hparams import backend_context as hp_backend
from tensorboard.plugins.hparams import metadata as hp_metadata
from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

import charlm.cli
from charlm import UserError
from charlm.cli import sample, train
from charlm.nn.rnn import RNNConfig
from charlm.training.module import CharLM, load_checkpoint
from charlm.training.optim import OptimConfig
from tests.conftest import (
    assert_user_error,
    compose_generate,
    compose_train,
    make_text,
    run_cli,
    run_train,
    tiny_overrides,
)


def sha(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def test_run_writes_checkpoints_and_metrics(tiny_run):
    out, metrics, _ = tiny_run
    assert (out / "checkpoints/last.ckpt").is_file() and (out / "checkpoints/best.ckpt").is_file()
    for stage in ("val", "test"):
        loss = metrics[f"{stage}/loss"]
        assert metrics[f"{stage}/ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
        assert metrics[f"{stage}/bpc"] == pytest.approx(loss / math.log(2), rel=1e-5)
    assert metrics["val/loss"] < math.log(16) - 0.5  # learned something beyond uniform over the tiny vocab


def hparams_summaries(run: Path) -> dict[str, bytes]:
    """The HPARAMS plugin's summaries in a run's event files: {tag: plugin data}."""
    found = {}
    for f in run.glob("events.*"):
        for ev in EventFileLoader(str(f)).Load():
            for v in ev.summary.value:
                if v.metadata.plugin_data.plugin_name == "hparams":
                    found[v.tag] = v.metadata.plugin_data.content
    return found


def hparams_entry(run: Path) -> dict:
    """A run's values in the HPARAMS tab: {hyperparameter: value}."""
    ssi = HParamsPluginData.FromString(hparams_summaries(run)[hp_metadata.SESSION_START_INFO_TAG]).session_start_info
    return {k: getattr(v, v.WhichOneof("kind")) for k, v in ssi.hparams.items()}


def hparams_columns(*runs: Path) -> list[str]:
    """The HPARAMS tab's hyperparameter columns over ``runs``, in its order, by TensorBoard's own code for runs
    without an experiment summary: those whose values differ between the runs first, each part by name."""
    content = {str(run): hparams_summaries(run) for run in runs}
    infos = hp_backend.Context(None)._compute_hparam_infos(content)
    experiment = hp_api.Experiment(hparam_infos=infos)
    hp_backend._sort_and_reduce_to_hparams_limit(experiment)
    return [h.name for h in experiment.hparam_infos]


def test_tensorboard_opens_on_the_curves_with_a_curated_hparams_entry(tiny_run):
    out, _, _ = tiny_run
    acc = EventAccumulator(str(out))
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    # Sections in the order TensorBoard lists them (code-point order): the curves first, no single-point clutter.
    assert {"1_val/bpc", "1_val/ppl", "1_val/loss", "2_train/bpc", "2_train/loss_step", "3_optim/grad_norm"} <= scalars
    assert any(t.startswith("3_optim/lr-") for t in scalars) and {"4_test/bpc", "4_test/ppl"} <= scalars
    assert sorted({t.split("/")[0] for t in scalars}) == ["1_val", "2_train", "3_optim", "4_test"]  # no hp/, epoch
    assert len(acc.Scalars("1_val/bpc")) == 2  # one per epoch
    assert any(t.startswith("sample") for t in acc.Tags()["tensors"])

    values = hparams_entry(out)
    model_keys = {f"model.{f.name}" for f in fields(RNNConfig)} | {f"optim.{f.name}" for f in fields(OptimConfig)}
    data_keys = {f"data.{k}" for k in ("corpus", "unit", "preprocess", "batch_size", "seq_len", "eval_batch_size")}
    data_keys |= {"data.batch_order", "data.splits"}
    trainer_keys = {f"trainer.{k}" for k in ("max_epochs", "max_steps", "max_time", "gradient_clip_val")}
    trainer_keys |= {"trainer.precision", "trainer.processes"}
    assert (
        set(values) == {"seed", "init_from", "freeze"} | model_keys | data_keys | trainer_keys
    )  # no _target_, paths, callbacks, name
    assert (values["model.hidden_size"], values["data.corpus"]) == (32, "tiny")


ONE_QUIET_EPOCH = ["trainer.max_epochs=1", "test=false", "sample_length=0", "callbacks.text_sample=null"]


def test_hparams_lists_the_settings_that_differ_between_runs_first(tiny_run, tmp_path):
    """No experiment summary: TensorBoard then builds the table from all runs, the settings whose values differ
    first (it shows five), and the metrics after them are the runs' scalars by name: the val curves first."""
    out, _, corpus = tiny_run
    other = tmp_path / "other"
    args = ["model.hidden_size=16", *ONE_QUIET_EPOCH]
    train(compose_train(tiny_overrides(corpus, other, *args)))
    assert hp_metadata.EXPERIMENT_TAG not in hparams_summaries(out) | hparams_summaries(other)
    assert hparams_columns(out, other)[:3] == ["model.hidden_size", "trainer.max_epochs", "data.batch_order"]
    acc = EventAccumulator(str(other))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"])[:3] == ["1_val/bpc", "1_val/loss", "1_val/ppl"]


def test_run_directories_are_named_for_the_experiment_and_its_settings(tmp_path, corpus):
    """A run started without hydra.run.dir lands in outputs/<experiment>/<its overrides>/<date>_<time...>/, which
    holds its TensorBoard events itself: TensorBoard names the run by that path."""
    overrides = [o for o in tiny_overrides(corpus, tmp_path) if not o.startswith("paths.output_dir")]
    args = ["experiment=shakespeare_1min", *overrides, "trainer.max_epochs=1", "trainer.max_time=null"]
    proc = run_cli("train.py", *args, "test=false", "sample_length=0", "callbacks.text_sample=null", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp_path / "outputs").iterdir()
    assert run.name == "shakespeare_1min"
    (settings,) = run.iterdir()
    assert "hidden_size=32" in settings.name.split(",") and "lr=0.01" in settings.name.split(",")
    assert "data.path" not in settings.name and "experiment" not in settings.name and "model." not in settings.name
    (stamp,) = settings.iterdir()
    assert stamp.name.startswith(date.today().isoformat() + "_") and (stamp / "checkpoints/last.ckpt").is_file()
    assert {p.parent for p in tmp_path.rglob("events.out.tfevents.*")} == {stamp}  # no tb/ level
    assert hparams_entry(stamp)["model.hidden_size"] == 32


def test_checkpoint_loads_without_hydra_and_carries_the_vocab(tiny_run):
    out, metrics, corpus = tiny_run
    model = CharLM.load_from_checkpoint(out / "checkpoints/best.ckpt", map_location="cpu", weights_only=True)
    assert "".join(model.vocab.chars) == "".join(sorted(set(corpus.read_text()) | {"\ufffd"}))
    assert model.hparams.hidden_size == 32


def test_generate_streams_prompt_plus_length(tiny_run, capsys):
    out, _, _ = tiny_run
    cfg = compose_generate([f"ckpt={out}/checkpoints/best.ckpt", "prompt='abc '", "length=57", "seed=3"])
    (text,) = sample(cfg)
    printed = capsys.readouterr().out
    assert printed == text + "\n" and text.startswith("abc ") and len(text) == 4 + 57
    texts = sample(
        compose_generate(
            [f"ckpt={out}/checkpoints/best.ckpt", "num_samples=3", "length=10", "prompt=ab", "temperature=0"]
        )
    )
    assert len(texts) == 3 and len(set(texts)) == 1 and all(len(t) == 12 for t in texts)


def test_resume_continues_exactly(tiny_run, tmp_path):
    """2 epochs + resume to 3 gives bit-identical weights to 3 epochs straight. No dropout (no RNG in the step)
    and no cosine (annealing over 2 epochs is another schedule than over 3); warm-up is kept."""
    out, _, corpus = tiny_run
    same = ["model.dropout=0", "optim.scheduler=none", "test=false"]
    straight = tmp_path / "straight"
    train(compose_train(tiny_overrides(corpus, straight, "trainer.max_epochs=3", *same)))
    first = tmp_path / "first"
    train(compose_train(tiny_overrides(corpus, first, *same)))
    resumed = tmp_path / "resumed"
    ckpt = f"ckpt_path={first}/checkpoints/last.ckpt"
    train(compose_train(tiny_overrides(corpus, resumed, "trainer.max_epochs=3", *same, ckpt)))
    a = torch.load(straight / "checkpoints/last.ckpt", weights_only=True)
    b = torch.load(resumed / "checkpoints/last.ckpt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2 and a["global_step"] == b["global_step"] > 0
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    # the characters-seen axis goes on from where the first run stopped, as in the straight run
    went_on = chars_seen(resumed)
    assert went_on[0][0] >= torch.load(first / "checkpoints/last.ckpt", weights_only=True)["global_step"]
    assert went_on == [(step, (step + 1) * 4 * 16) for step, _ in went_on]
    assert set(went_on) <= set(chars_seen(straight))


def loss_steps(run: Path) -> list[int]:
    acc = EventAccumulator(str(run))
    acc.Reload()
    return [e.step for e in acc.Scalars("2_train/loss_step")]


def test_a_resume_from_a_runs_checkpoint_goes_on_in_that_run_with_its_settings(corpus, tmp_path):
    """ckpt_path= alone: the run's overrides come back from its .hydra/overrides.yaml (what the command line sets
    again wins), and it goes on in its own directory: one TensorBoard run whose steps go on, and no Lightning
    warning that the checkpoint directory changed."""
    out = tmp_path / "run"
    args = ["model.hidden_size=16", *ONE_QUIET_EPOCH]
    train(compose_train(tiny_overrides(corpus, out, *args), return_hydra_config=True))
    first = loss_steps(out)
    cfg = compose_train([f"ckpt_path={out}/checkpoints/last.ckpt", "trainer.max_epochs=2"])
    assert (cfg.model.hidden_size, cfg.trainer.max_epochs, cfg.paths.output_dir) == (16, 2, str(out))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg)
    assert not [w for w in caught if "dirpath" in str(w.message)], [str(w.message) for w in caught]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "run", "tiny.txt"]
    went_on = loss_steps(out)
    assert went_on[: len(first)] == first and went_on == sorted(set(went_on)) and len(went_on) > len(first)


def test_checkpoint_switches_between_fused_and_scratch_without_conversion(tiny_run, tmp_path):
    out, _, corpus = tiny_run
    ckpt = f"{out}/checkpoints/best.ckpt"
    fused, scratch = load_checkpoint(ckpt), load_checkpoint(ckpt, impl="scratch")
    assert type(scratch.net.layers[0]).__name__ == "ScratchLayer" and scratch.hparams.impl == "scratch"
    x = torch.randint(0, len(fused.vocab), (2, 30))
    torch.testing.assert_close(scratch.eval()(x)[0], fused.eval()(x)[0], atol=1e-4, rtol=1e-4)
    texts = [
        sample(compose_generate([f"ckpt={ckpt}", "prompt=ab", "length=40", "temperature=0", f"impl={impl}"]))
        for impl in ("fused", "scratch")
    ]
    assert texts[0] == texts[1]
    # and training resumes from the fused checkpoint on the scratch path
    cfg = compose_train(
        tiny_overrides(
            corpus,
            tmp_path / "s",
            "trainer.max_epochs=3",
            "model.impl=scratch",
            f"ckpt_path={out}/checkpoints/last.ckpt",
        )
    )
    metrics = train(cfg)
    assert load_checkpoint(tmp_path / "s/checkpoints/last.ckpt").hparams.impl == "scratch"
    assert metrics["val/loss"] < math.log(16) - 0.5


def test_resume_refuses_a_checkpoint_with_another_vocab(tiny_run, tmp_path):
    out, _, _ = tiny_run
    other = tmp_path / "other.txt"
    other.write_text(make_text(seed=1).upper(), encoding="utf-8")
    cfg = compose_train(tiny_overrides(other, tmp_path / "o", f"ckpt_path={out}/checkpoints/last.ckpt"))
    with pytest.raises(UserError, match="different vocab"):
        train(cfg)


# ---- every user mistake: one line on stderr naming the fix, exit code 2, no traceback, no checkpoint lost ----


def bad_corpus(tmp: Path, kind: str) -> Path:
    path = tmp / f"{kind}.txt"
    content = {"empty": b"", "latin1": "caf\xe9 au lait".encode("latin-1"), "small": b"abc" * 40}.get(kind)
    if content is not None:
        path.write_bytes(content)
    return path


def custom_charts(acc: EventAccumulator) -> dict[str, list[str]]:
    """The CUSTOM SCALARS tab of a run: {chart title: the tag patterns it plots}."""
    (event,) = acc.Tensors("custom_scalars__config__")
    layout = Layout.FromString(event.tensor_proto.string_val[0])
    return {chart.title: list(chart.multiline.tag) for c in layout.category for chart in c.chart}


def chars_seen(run: Path) -> list[tuple[int, float]]:
    """(TensorBoard step, characters trained on) as logged: the steps count from 0, so batch k is step k - 1."""
    acc = EventAccumulator(str(run))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars("3_optim/chars_seen")]


def test_tensorboard_plots_train_next_to_val_and_counts_the_characters_seen(tiny_run):
    out, _, _ = tiny_run
    acc = EventAccumulator(str(out))
    acc.Reload()
    charts = custom_charts(acc)
    scalars = acc.Tags()["scalars"]
    for tags in (["2_train/bpc", "1_val/bpc"], ["2_train/loss_step", "2_train/loss", "1_val/loss"]):
        (chart,) = [title for title, patterns in charts.items() if len(patterns) == len(tags)]
        assert [[t for t in scalars if re.search(p, t)] for p in charts[chart]] == [[t] for t in tags], chart
    seen = chars_seen(out)
    steps = [step for step, _ in seen]
    assert steps == [e.step for e in acc.Scalars("2_train/loss_step")] and len(steps) > 2  # logged as the others are
    assert seen == [(step, (step + 1) * 4 * 16) for step in steps]  # batch_size x seq_len a step


TRAIN_REFUSES = {  # the overrides (space-separated) -> what its one error line says
    "data.path={tmp}/missing.txt": "does not exist",
    "data.path={tmp}/empty.txt": "is empty",
    "data.path={tmp}/latin1.txt": "not valid UTF-8 at byte offset 3",
    "data.path={tmp}/small.txt": "needs at least",
    "model.dropout=1.0": "model.dropout",
    "model.num_layers=0": "model.num_layers",
    "model.cell=transformer": "model.cell",
    "data.splits=[0.9,0.2,0.1]": "data.splits",
    "ckpt_path={tmp}/nope.ckpt": "does not exist",
    "ckpt_path={tmp}/corrupt.ckpt": "corrupt",
}


@pytest.mark.parametrize(("args", "match"), TRAIN_REFUSES.items())
def test_train_cli_rejects_bad_input(tmp_path, tiny_run, args, match):
    out, _, corpus = tiny_run
    for kind in ("empty", "latin1", "small"):
        bad_corpus(tmp_path, kind)
    (tmp_path / "corrupt.ckpt").write_bytes(b"PK\x03\x04 not really a zip")
    before = {p.name: sha(p) for p in (out / "checkpoints").iterdir()}
    base = tiny_overrides(corpus, out, "trainer.max_epochs=1")  # point at the existing run: nothing may be lost
    proc = run_cli("train.py", *base, *args.format(tmp=tmp_path).split())
    assert_user_error(proc, match)
    assert {p.name: sha(p) for p in (out / "checkpoints").iterdir()} == before


def test_generate_cli_streams_and_rejects_bad_input(tiny_run, tmp_path):
    out, _, _ = tiny_run
    ckpt = out / "checkpoints/best.ckpt"
    ok = run_cli("generate.py", f"ckpt={ckpt}", "prompt=ab", "length=30")
    assert ok.returncode == 0 and ok.stdout.startswith("ab") and len(ok.stdout.rstrip("\n")) == 32
    assert_user_error(run_cli("generate.py", f"ckpt={tmp_path}/missing.ckpt"), "does not exist")
    (tmp_path / "corrupt.ckpt").write_bytes(b"\x00garbage")
    assert_user_error(run_cli("generate.py", f"ckpt={tmp_path}/corrupt.ckpt"), "corrupt")
    assert_user_error(run_cli("generate.py", f"ckpt={ckpt}", "prompt=Zebra"), "not in the vocab")
    # A checkpoint that smuggles code (a pickled callable) is refused by weights_only loading, never executed.
    evil = torch.load(ckpt, weights_only=True)
    evil["hyper_parameters"]["hook"] = functools.partial(os.system, "echo pwned")
    torch.save(evil, tmp_path / "evil.ckpt")
    proc = run_cli("generate.py", f"ckpt={tmp_path}/evil.ckpt")
    assert_user_error(proc, "refused")
    assert "pwned" not in proc.stdout
    with pytest.raises(UserError, match="refused"):
        load_checkpoint(tmp_path / "evil.ckpt")


def test_prompt_file_reads_the_prompt_and_follows_unknown(tiny_run, tmp_path, capsys):
    out, _, _ = tiny_run
    ckpt = f"ckpt={out}/checkpoints/best.ckpt"
    (tmp_path / "p.txt").write_text("abc ", encoding="utf-8")
    (direct,) = sample(compose_generate([ckpt, "prompt='abc '", "length=40", "temperature=0"]))
    (from_file,) = sample(compose_generate([ckpt, f"prompt_file={tmp_path}/p.txt", "length=40", "temperature=0"]))
    assert from_file == direct and direct.startswith("abc ")
    (tmp_path / "z.txt").write_text("aZc ", encoding="utf-8")  # Z is not in the tiny vocab
    with pytest.raises(UserError, match="not in the vocab"):
        sample(compose_generate([ckpt, f"prompt_file={tmp_path}/z.txt", "length=5"]))
    (unk,) = sample(
        compose_generate([ckpt, f"prompt_file={tmp_path}/z.txt", "unknown=unk", "length=40", "temperature=0"])
    )
    assert unk.startswith("aZc ") and unk != direct  # the model read "a?c ", not "abc "


SAMPLER_REFUSES = {  # the options (space-separated) -> the error
    "prompt=ab prompt_file={tmp}/p.txt": "prompt and prompt_file are both given; pass only one of them.",
    "prompt_file={tmp}/missing.txt": "does not exist; pass a UTF-8 text file.",
    "prompt_file={tmp}": "is a directory; pass a UTF-8 text file.",
    "prompt_file={tmp}/latin1.txt": "is not UTF-8 text (bad byte at offset 1)",
    "stop=''": "stop='' must be non-empty text",
    "format=xml": "format='xml' is not known; use one of text, jsonl.",
    "threads=0": "threads=0 must be a whole number >= 1; e.g. threads=1 (null: torch's default).",
}


@pytest.mark.parametrize(("args", "match"), SAMPLER_REFUSES.items())
def test_sampler_options_reject_bad_input_in_one_line(tiny_run, tmp_path, args, match):
    out, _, _ = tiny_run
    (tmp_path / "p.txt").write_text("ab", encoding="utf-8")
    (tmp_path / "latin1.txt").write_bytes("a\xe9b".encode("latin-1"))
    with pytest.raises(UserError, match=re.escape(match)):
        sample(compose_generate([f"ckpt={out}/checkpoints/best.ckpt", *args.format(tmp=tmp_path).split()]))


def test_threads_sets_the_samplers_threads_and_then_gives_them_back(tiny_run, monkeypatch, capsys):
    """threads=1 runs the whole generation on one thread (faster for one stream on some CPUs: README, Speed), and
    the process's own setting is back afterwards, also when sampling fails; the text is the same either way."""
    out, _, _ = tiny_run
    seen, real = [], charlm.cli.stream_text

    def spy(*args, **kwargs):
        for piece in real(*args, **kwargs):
            seen.append(torch.get_num_threads())
            yield piece

    monkeypatch.setattr(charlm.cli, "stream_text", spy)
    before = torch.get_num_threads()
    base = [f"ckpt={out}/checkpoints/best.ckpt", "prompt=ab", "length=20"]
    one = sample(compose_generate([*base, "threads=1"]))
    assert set(seen) == {1} and len(seen) == 21 and torch.get_num_threads() == before  # the prompt, 20 characters
    seen.clear()
    assert sample(compose_generate(base)) == one and set(seen) == {before}
    monkeypatch.setattr(charlm.cli, "stream_text", lambda *a, **k: iter([("x",), 1]))  # fails inside the loop
    with pytest.raises(TypeError):
        sample(compose_generate([*base, "threads=1"]))
    assert torch.get_num_threads() == before


def test_several_samples_print_as_blocks_or_json_lines_with_stop(tiny_run, capsys):
    out, _, _ = tiny_run
    base = [f"ckpt={out}/checkpoints/best.ckpt", "prompt=ab", "num_samples=4", "length=30", "seed=2"]
    texts = sample(compose_generate(base))
    printed = capsys.readouterr().out
    assert printed == "".join(f"--- sample {i}/4 ---\n{t}\n" for i, t in enumerate(texts, start=1))
    stopped = sample(compose_generate([*base, "format=jsonl", "stop=' '"]))
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["sample"] for r in records] == [1, 2, 3, 4]
    for record, whole, cut in zip(records, texts, stopped, strict=True):
        at = whole.find(" ", 2)
        assert cut == (whole if at < 0 else whole[: at + 1])  # the same draws, cut at the first stop text
        assert record == {"prompt": "ab", "completion": cut[2:], "stopped": at >= 0, "sample": record["sample"]}
    assert any(r["stopped"] for r in records)


def test_generate_decodes_escapes_typed_on_the_command_line(tiny_run):
    """'stop="\n\n"' as typed in a shell reaches Hydra as a backslash and an n: it stops at a blank line, and a
    prompt's \t is a tab (one the tiny vocab lacks: unknown=unk feeds it as the unknown character)."""
    out, _, _ = tiny_run
    args = [f"ckpt={out}/checkpoints/best.ckpt", r'prompt="a\tb"', "unknown=unk", r'stop="\n\n"']
    # near-uniform draws over the 16 characters: a blank line comes within a few hundred of them
    proc = run_cli("generate.py", *args, "temperature=5", "length=3000", "format=jsonl")
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(proc.stdout)
    assert record["prompt"] == "a\tb" and record["stopped"]
    assert record["completion"].endswith("\n\n") and "\n\n" not in record["completion"][:-1]


def test_ddp_cpu_two_ranks_train_on_disjoint_streams(tmp_path):
    corpus = tmp_path / "tiny.txt"
    text = make_text(8000)
    corpus.write_text(text, encoding="utf-8")
    out = tmp_path / "ddp"
    out.mkdir()
    probe = ("+callbacks.probe._target_=tests.probe.RecordBatches", f"+callbacks.probe.out={out}")
    run_train(out, *tiny_overrides(corpus, out, "trainer=ddp_cpu", "trainer.devices=2", "sample_length=0", *probe))
    rank0, rank1 = np.load(out / "rank0.npy"), np.load(out / "rank1.npy")
    assert rank0.shape == rank1.shape  # same number of batches, same batch size
    model = load_checkpoint(out / "checkpoints/last.ckpt")
    train_text = text[: round(len(text) * 0.9)]
    spans = []
    for rows in (rank0, rank1):
        for row in rows:
            stream = model.vocab.decode(row)
            start = train_text.find(stream)
            assert start >= 0  # each stream is one contiguous stretch of the train split
            spans.append((start, start + len(stream)))
    spans.sort()
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False))  # disjoint


def test_folder_and_pre_split_corpora_train_through_the_config(tmp_path):
    books = tmp_path / "books"
    books.mkdir()
    for i in range(3):
        (books / f"{i}.txt").write_text(make_text(3000, seed=i), encoding="utf-8")
    base = [o for o in tiny_overrides(books, tmp_path / "a", "trainer.max_epochs=1", "sample_length=0")]
    cfg = compose_train(base)
    assert cfg.name == "books"
    assert set(train(cfg)) >= {"val/bpc", "test/bpc"}
    split = [o for o in base if not o.startswith(("data.path", "paths.output_dir"))] + [
        "data.path=null",
        f"data.train_path={books}/0.txt",
        f"data.val_path={books}/1.txt",
        f"data.test_path={books}/2.txt",
        f"paths.output_dir={tmp_path / 'b'}",
    ]
    cfg = compose_train(split)
    assert cfg.name == "books"  # a pre-split corpus is named for its folder
    metrics = train(cfg)
    assert math.isfinite(metrics["test/bpc"])


@pytest.mark.parametrize("batch_order", ["tbptt", "random"])
def test_a_batch_schedule_reaches_the_trainer_by_the_run_step(tmp_path, batch_order):
    """data.schedule from the command line: every training batch has the shape the schedule gives its global step,
    across the epoch boundary (epoch 1 starts inside the second phase), then data.batch_size x data.seq_len."""
    corpus = tmp_path / "tiny.txt"
    corpus.write_text(make_text(), encoding="utf-8")
    out = tmp_path / "out"
    size = 4 if batch_order == "tbptt" else 2  # TBPTT streams keep their batch size; random windows need not
    schedule = [[30, size, 4], [100, 4, 8]]
    extra = [f"data.batch_order={batch_order}", f"data.schedule={json.dumps(schedule).replace(' ', '')}"]
    extra += ["test=false", "sample_length=0", "logger=none", "callbacks=no_logger"]
    extra += ["+callbacks.shapes._target_=tests.probe.RecordShapes", f"+callbacks.shapes.out={tmp_path}"]
    train(compose_train(tiny_overrides(corpus, out, *extra)))
    shapes = np.load(tmp_path / "shapes.npy")  # [steps, 3]: global step, batch size, seq_len
    assert len(shapes) == 2 * 84 and (shapes[:, 0] == np.arange(len(shapes))).all()  # 84 batches an epoch
    want = [[size, 4]] * 30 + [[4, 8]] * 70 + [[4, 16]] * 68
    assert shapes[:, 1:].tolist() == want
