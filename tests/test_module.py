"""CharLM behaviour inside a real Trainer: token-weighted epoch metrics and the LR schedules."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from charlm.data import StreamBatches
from charlm.module import CharLM
from charlm.vocab import CharVocab
from tests.conftest import compose_train, tiny_overrides
from train import train


def test_epoch_metrics_are_token_weighted_not_a_mean_of_batches():
    torch.manual_seed(0)
    model = CharLM(CharVocab.from_text("abcdefgh").to_dict(), hidden_size=16)
    tokens = torch.randint(0, 8, (2 * 53 + 1,)).numpy()
    ds = StreamBatches(tokens, batch_size=2, seq_len=20, drop_last=False)  # T = 20, 20, 13: unequal batches
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (result,) = trainer.validate(model, DataLoader(ds, batch_size=None), verbose=False)

    nll, count, state = 0.0, 0, None
    model.eval()
    with torch.no_grad():
        for x, y, reset in ds:
            logits, state = model(x, None if reset else state)
            nll += F.cross_entropy(logits.reshape(-1, 8), y.reshape(-1), reduction="sum").item()
            count += y.numel()
    assert count == 106
    assert result["val/loss"] == pytest.approx(nll / count, rel=1e-5)
    assert result["val/ppl"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert result["val/bpc"] == pytest.approx(nll / count / math.log(2), rel=1e-5)


def lr_curve(out) -> list[float]:
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    (tag,) = [t for t in acc.Tags()["scalars"] if t.startswith("lr-")]
    return [e.value for e in acc.Scalars(tag)]


def test_zaremba_step_decay_and_cosine_with_warmup(corpus, tmp_path):
    step = tmp_path / "step"
    extra = ["test=false", "sample_length=0", "trainer.max_epochs=3", "trainer.log_every_n_steps=1"]
    train(
        compose_train(
            tiny_overrides(
                corpus,
                step,
                *extra,
                "model.optimizer=sgd",
                "model.lr=1.0",
                "model.scheduler=step",
                "model.decay_start=1",
                "model.decay_factor=0.5",
            )
        )
    )
    assert sorted(set(lr_curve(step)), reverse=True) == pytest.approx([1.0, 0.5, 0.25])

    cos = tmp_path / "cos"
    train(
        compose_train(
            tiny_overrides(
                corpus,
                cos,
                *extra,
                "model.lr=0.01",
                "model.scheduler=cosine",
                "model.warmup_steps=10",
                "model.min_lr=0.001",
            )
        )
    )
    lrs = lr_curve(cos)
    assert lrs[0] == pytest.approx(0.001) and max(lrs) == pytest.approx(0.01, rel=0.02)
    assert lrs[-1] < 0.0015 and lrs[-1] >= 0.001  # annealed to the floor by the last step


def test_cosine_follows_the_wall_clock_under_max_time(corpus, tmp_path):
    """With only trainer.max_time to end the run, cosine anneals by elapsed time: ~lr at the start, ~min_lr at
    the end, however many steps fit (5-minute recipes rely on this)."""
    out = tmp_path / "timed"
    extra = ["test=false", "sample_length=0", "trainer.max_epochs=-1", "trainer.log_every_n_steps=1"]
    timed = ["trainer.max_time=00:00:00:06", "model.scheduler=cosine", "model.lr=0.01", "model.min_lr=0.0001"]
    timed.append("model.warmup_steps=0")
    train(compose_train(tiny_overrides(corpus, out, *extra, *timed)))
    lrs = lr_curve(out)
    assert len(lrs) > 20
    assert lrs[0] > 0.009 and lrs[-1] < 0.002  # the whole cosine, start to end, within the time budget
    assert all(b <= a for a, b in zip(lrs, lrs[1:], strict=False))  # monotone: no restart, no jump
    assert lrs[len(lrs) // 2] < 0.0095  # and it moved during the run, not only at the end
