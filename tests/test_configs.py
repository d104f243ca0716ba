"""Every shipped config composes into objects that can train; sweeps run; presets say what they claim."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.utils import instantiate

from tests.conftest import ROOT, compose_train, make_text, run_cli, tiny_overrides

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf/experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_builds_its_data_and_model(experiment, tmp_path):
    cfg = compose_train([f"experiment={experiment}", f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path}"])
    dm = instantiate(cfg.data)
    dm.check_sizes()
    model = instantiate(cfg.model, vocab=dm.vocab.to_dict())
    assert model.net.vocab_size == len(dm.vocab)
    trainer = instantiate(cfg.trainer, logger=False)
    assert trainer.max_epochs == cfg.trainer.max_epochs


def test_d2l_preset_is_the_d2l_recipe(tmp_path):
    cfg = compose_train(["experiment=d2l_deep_gru", f"paths.output_dir={tmp_path}", f"paths.cache_dir={tmp_path}"])
    m, d = cfg.model, cfg.data
    assert (m.cell, m.num_layers, m.hidden_size, m.embedding_size, m.optimizer, m.lr) == ("gru", 2, 32, 0, "sgd", 2.0)
    assert (d.batch_size, d.seq_len, d.preprocess, cfg.trainer.gradient_clip_val) == (1024, 32, "d2l", 1.0)
    dm = instantiate(d)
    assert len(dm.vocab) == 28


@pytest.mark.parametrize("preset", ["trainer=cpu", "trainer=gpu", "trainer=ddp", "trainer=ddp_cpu", "logger=none"])
def test_other_groups_compose(preset, tmp_path):
    cfg = compose_train([preset, f"paths.output_dir={tmp_path}"])
    assert cfg.trainer._target_ == "pytorch_lightning.Trainer"


def test_multirun_sweep_trains_each_point(tmp_path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text(make_text(), encoding="utf-8")
    overrides = [
        o
        for o in tiny_overrides(corpus, tmp_path, "trainer.max_epochs=1", "test=false", "sample_length=0")
        if not o.startswith("paths.output_dir") and not o.startswith("model.hidden_size")
    ]
    proc = run_cli("train.py", "-m", "model.hidden_size=8,16", f"hydra.sweep.dir={tmp_path}/sweep", *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for job in ("0", "1"):
        assert (tmp_path / "sweep" / job / "checkpoints/last.ckpt").is_file()
        assert list((tmp_path / "sweep" / job / "tb").glob("events.*"))


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_smoke_run(experiment, tmp_path: Path):
    proc = run_cli(
        "train.py",
        f"experiment={experiment}",
        "debug=fast",
        "trainer.limit_train_batches=2",
        f"hydra.run.dir={tmp_path}",
        f"paths.cache_dir={tmp_path}/cache",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "checkpoints/last.ckpt").is_file()
