"""The real train() and sample() entry points (charlm.cli), end to end, on a tiny corpus and model."""

from __future__ import annotations

import functools
import hashlib
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from charlm import UserError
from charlm.cli import sample, train
from charlm.module import CharLM, load_checkpoint
from tests.conftest import assert_user_error, compose_generate, compose_train, make_text, run_cli, tiny_overrides


def sha(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny real run shared by the tests below: (output dir, metrics, corpus)."""
    tmp = tmp_path_factory.mktemp("run")
    corpus = tmp / "tiny.txt"
    corpus.write_text(make_text(), encoding="utf-8")
    out = tmp / "out"
    metrics = train(compose_train(tiny_overrides(corpus, out)))
    return out, metrics, corpus


def test_run_writes_checkpoints_and_metrics(trained):
    out, metrics, _ = trained
    assert (out / "checkpoints/last.ckpt").is_file() and (out / "checkpoints/best.ckpt").is_file()
    for stage in ("val", "test"):
        loss = metrics[f"{stage}/loss"]
        assert metrics[f"{stage}/ppl"] == pytest.approx(math.exp(loss), rel=1e-5)
        assert metrics[f"{stage}/bpc"] == pytest.approx(loss / math.log(2), rel=1e-5)
    assert metrics["val/loss"] < math.log(16) - 0.5  # learned something beyond uniform over the tiny vocab


def test_tensorboard_has_metrics_lr_samples_and_hparams(trained):
    out, _, _ = trained
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    for stage in ("train", "val", "test"):
        assert {f"{stage}/loss", f"{stage}/ppl", f"{stage}/bpc"} <= scalars
    assert any(t.startswith("lr-") for t in scalars)
    assert {"hp/val_loss", "hp/val_bpc", "hp/test_bpc"} <= scalars
    assert any(t.startswith("sample") for t in acc.Tags()["tensors"])
    hparams = {  # the HPARAMS tab entry: plugin summaries with empty tensors, which EventAccumulator drops
        v.tag: v.metadata.plugin_data.content
        for f in (out / "tb").glob("events.*")
        for ev in EventFileLoader(str(f)).Load()
        for v in ev.summary.value
        if v.metadata.plugin_data.plugin_name == "hparams"
    }
    assert b"hp/val_bpc" in hparams["_hparams_/experiment"] and b"model/hidden_size" in hparams["_hparams_/experiment"]
    assert len(acc.Scalars("val/bpc")) == 2  # one per epoch


def test_checkpoint_loads_without_hydra_and_carries_the_vocab(trained):
    out, metrics, corpus = trained
    model = CharLM.load_from_checkpoint(out / "checkpoints/best.ckpt", map_location="cpu", weights_only=True)
    assert "".join(model.vocab.chars) == "".join(sorted(set(corpus.read_text()) | {"\ufffd"}))
    assert model.hparams.hidden_size == 32


def test_generate_streams_prompt_plus_length(trained, capsys):
    out, _, _ = trained
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


def test_resume_continues_exactly(trained, tmp_path):
    """2 epochs + resume to 3 gives bit-identical weights to 3 epochs straight. No dropout (no RNG in the step)
    and no cosine (annealing over 2 epochs is another schedule than over 3); warm-up is kept."""
    out, _, corpus = trained
    same = ["model.dropout=0", "model.scheduler=none", "test=false"]
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


def test_checkpoint_switches_between_fused_and_scratch_without_conversion(trained, tmp_path):
    out, _, corpus = trained
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


def test_resume_refuses_a_checkpoint_with_another_vocab(trained, tmp_path):
    out, _, _ = trained
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


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["data.path={tmp}/missing.txt"], "does not exist"),
        (["data.path={tmp}/empty.txt"], "is empty"),
        (["data.path={tmp}/latin1.txt"], "not valid UTF-8 at byte offset 3"),
        (["data.path={tmp}/small.txt"], "needs at least"),
        (["model.dropout=1.0"], "model.dropout"),
        (["model.num_layers=0"], "model.num_layers"),
        (["model.cell=transformer"], "model.cell"),
        (["data.splits=[0.9,0.2,0.1]"], "data.splits"),
        (["ckpt_path={tmp}/nope.ckpt"], "does not exist"),
        (["ckpt_path={tmp}/corrupt.ckpt"], "corrupt"),
    ],
)
def test_train_cli_rejects_bad_input(tmp_path, trained, args, match):
    out, _, corpus = trained
    for kind in ("empty", "latin1", "small"):
        bad_corpus(tmp_path, kind)
    (tmp_path / "corrupt.ckpt").write_bytes(b"PK\x03\x04 not really a zip")
    before = {p.name: sha(p) for p in (out / "checkpoints").iterdir()}
    base = tiny_overrides(corpus, out, "trainer.max_epochs=1")  # point at the existing run: nothing may be lost
    proc = run_cli("train.py", *base, *[a.format(tmp=tmp_path) for a in args])
    assert_user_error(proc, match)
    assert {p.name: sha(p) for p in (out / "checkpoints").iterdir()} == before


def test_generate_cli_streams_and_rejects_bad_input(trained, tmp_path):
    out, _, _ = trained
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


def test_ddp_cpu_two_ranks_train_on_disjoint_streams(tmp_path):
    corpus = tmp_path / "tiny.txt"
    text = make_text(8000)
    corpus.write_text(text, encoding="utf-8")
    out = tmp_path / "ddp"
    out.mkdir()
    proc = run_cli(
        "train.py",
        *tiny_overrides(
            corpus,
            out,
            "trainer=ddp_cpu",
            "trainer.devices=2",
            "sample_length=0",
            "+callbacks.probe._target_=tests.probe.RecordBatches",
            f"+callbacks.probe.out={out}",
            f"hydra.run.dir={out}",
        ),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "checkpoints/last.ckpt").is_file()
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
