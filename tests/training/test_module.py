"""CharLM behaviour inside a real Trainer: token-weighted epoch metrics and the LR schedules."""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Timer
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

from charlm import UserError
from charlm.cli import train
from charlm.config import build
from charlm.data.datamodule import StreamBatches
from charlm.data.vocab import CharVocab
from charlm.training.callbacks import Throughput
from charlm.training.module import CharLM
from charlm.training.optim import OptimConfig, WarmupDecayLR
from tests.conftest import compose_train, tiny_overrides


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
    acc = EventAccumulator(str(out))
    acc.Reload()
    (tag,) = [t for t in acc.Tags()["scalars"] if t.startswith("3_optim/lr-")]
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
                "optim.optimizer=sgd",
                "optim.lr=1.0",
                "optim.scheduler=step",
                "optim.decay_start=1",
                "optim.decay_factor=0.5",
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
                "optim.lr=0.01",
                "optim.scheduler=cosine",
                "optim.warmup_steps=10",
                "optim.min_lr=0.001",
            )
        )
    )
    lrs = lr_curve(cos)
    assert lrs[0] == pytest.approx(0.001) and max(lrs) == pytest.approx(0.01, rel=0.02)
    assert lrs[-1] < 0.0015 and lrs[-1] >= 0.001  # annealed to the floor by the last step


class FakeClock:
    """What Lightning's Timer tells the schedule: (seconds elapsed, seconds remaining) of a ``budget_s`` run."""

    def __init__(self, budget_s: float):
        self.now, self.budget_s = 0.0, budget_s

    def __call__(self) -> tuple[float, float]:
        return self.now, self.budget_s - self.now


def timed_cosine(
    clock: FakeClock, warmup_steps: int = 0, total_steps: float = math.inf, shape: str = "cosine"
) -> WarmupDecayLR:
    """lr 0.01 annealed to min_lr 0.0001 (floor 0.01), as CharLM builds it under trainer.max_time."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.01)
    return WarmupDecayLR(opt, warmup_steps, total_steps, floor=0.01, shape=shape, clock=clock, cooldown=0.25)


def lr_of(sched: WarmupDecayLR) -> float:
    return sched.optimizer.param_groups[0]["lr"]


def advance(sched: WarmupDecayLR, clock: FakeClock, steps: int, seconds: float) -> None:
    """``steps`` optimizer steps spread evenly over ``seconds`` of the clock."""
    for _ in range(steps):
        clock.now += seconds / steps
        sched.optimizer.step()
        sched.step()


def test_cosine_follows_the_clock_under_max_time_however_many_steps_fit():
    """With only trainer.max_time to end the run (total_steps = inf), cosine anneals by elapsed time: ~lr after
    warm-up, half way at half the time after warm-up, min_lr at the end, whether 10 or 1,000 steps fit
    (5-minute recipes rely on this)."""
    curves = {}
    for steps_per_phase in (10, 1000):
        clock = FakeClock(budget_s=110.0)
        sched = timed_cosine(clock, warmup_steps=5)
        lrs = [lr_of(sched)]
        for _ in range(5):  # warm-up: by steps, 2 s each
            advance(sched, clock, 1, 2.0)
            lrs.append(lr_of(sched))
        assert lrs[:5] == pytest.approx([0.002, 0.004, 0.006, 0.008, 0.01])
        assert lrs[5] == pytest.approx(0.01) and sched.warmup_end_s == 10.0  # the cosine starts where warm-up ended
        advance(sched, clock, steps_per_phase, 50.0)  # half of the 100 s left after warm-up
        half = lr_of(sched)
        advance(sched, clock, steps_per_phase, 50.0)  # the whole budget
        end = lr_of(sched)
        advance(sched, clock, 3, 0.0)  # Lightning may step once more after the Timer stops the run
        curves[steps_per_phase] = (half, end, lr_of(sched))
    for half, end, after in curves.values():
        assert half == pytest.approx(0.0001 + (0.01 - 0.0001) / 2)
        assert end == pytest.approx(0.0001) and after == pytest.approx(0.0001)
    assert curves[10] == pytest.approx(curves[1000])  # independent of the number of steps


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        # lr at 0, 25, 50, 75 and 100 % of the 100 s after warm-up, floor 0.0001
        ("cosine", [0.01, *(0.0001 + 0.0099 * 0.5 * (1 + math.cos(math.pi * q / 4)) for q in (1, 2, 3)), 0.0001]),
        ("linear", [0.01, 0.0001 + 0.0099 * 0.75, 0.00505, 0.0001 + 0.0099 * 0.25, 0.0001]),
        ("wsd", [0.01, 0.01, 0.01, 0.01, 0.0001]),  # flat until the last quarter (cooldown 0.25), then a line
    ],
)
def test_decay_shapes_follow_the_clock_from_lr_to_min_lr(shape, expected):
    """Each shape starts at lr where warm-up ends and reaches min_lr at the end of the budget; in between it has
    its own form: wsd holds lr until the cooldown, then falls in a straight line (half way at 7/8 of the run)."""
    clock = FakeClock(budget_s=110.0)
    sched = timed_cosine(clock, warmup_steps=5, shape=shape)
    advance(sched, clock, 5, 10.0)
    seen = [lr_of(sched)]
    for _ in range(4):
        advance(sched, clock, 25, 25.0)
        seen.append(lr_of(sched))
    assert seen == pytest.approx(expected)
    if shape == "wsd":  # half way down the cooldown: 7/8 of the budget after warm-up
        clock = FakeClock(budget_s=110.0)
        sched = timed_cosine(clock, warmup_steps=5, shape=shape)
        advance(sched, clock, 5, 10.0)
        advance(sched, clock, 10, 87.5)
        assert lr_of(sched) == pytest.approx(0.0001 + 0.0099 * 0.5)


def test_unknown_cooldown_or_shape_is_one_line():
    vocab = CharVocab.from_text("abc").to_dict()
    with pytest.raises(UserError, match=r"optim.cooldown=0 must be in \(0, 1\]"):
        CharLM(vocab, scheduler="wsd", cooldown=0)
    with pytest.raises(UserError, match="optim.scheduler='exp' is not known; use one of .*linear, wsd"):
        CharLM(vocab, scheduler="exp")


def test_cosine_under_max_time_takes_the_further_of_steps_and_clock():
    """A run that ends by max_steps before max_time anneals by steps; one that ends by time, by the clock."""
    clock = FakeClock(budget_s=1000.0)
    by_steps = timed_cosine(clock, total_steps=20)
    advance(by_steps, clock, 10, 1.0)  # half the steps, 1 % of the time
    assert lr_of(by_steps) == pytest.approx(0.0001 + (0.01 - 0.0001) / 2)
    clock = FakeClock(budget_s=100.0)
    by_time = timed_cosine(clock, total_steps=1_000_000)
    advance(by_time, clock, 10, 50.0)  # half the time, a thousandth of the steps
    assert lr_of(by_time) == pytest.approx(0.0001 + (0.01 - 0.0001) / 2)


def test_cosine_clock_state_round_trips_through_a_checkpoint(tmp_path):
    """The clock reading when warm-up ended is state: a resumed run (whose Timer resumes the elapsed time) goes on
    with the same schedule, and the checkpoint loads with weights_only."""
    clock = FakeClock(budget_s=100.0)
    sched = timed_cosine(clock, warmup_steps=2)
    advance(sched, clock, 2, 6.0)
    advance(sched, clock, 4, 20.0)
    assert sched.warmup_end_s == 6.0 and "clock" not in sched.state_dict() and "optimizer" not in sched.state_dict()
    torch.save(sched.state_dict(), tmp_path / "sched.pt")
    saved = torch.load(tmp_path / "sched.pt", weights_only=True)

    resumed_clock = FakeClock(budget_s=100.0)
    resumed_clock.now = clock.now  # Lightning's Timer restores its elapsed time
    resumed = timed_cosine(resumed_clock, warmup_steps=2)
    resumed.load_state_dict(saved)
    assert resumed.warmup_end_s == 6.0 and resumed.last_epoch == sched.last_epoch and resumed.clock is resumed_clock
    advance(sched, clock, 5, 30.0)
    advance(resumed, resumed_clock, 5, 30.0)
    assert lr_of(resumed) == pytest.approx(lr_of(sched))
    assert lr_of(sched) == pytest.approx(0.0001 + (0.01 - 0.0001) * 0.5 * (1 + math.cos(math.pi * 50 / 94)))
    # without the saved warm-up end, the clock reading at the first resumed step would restart the cosine
    fresh_clock = FakeClock(budget_s=100.0)
    fresh_clock.now = 56.0
    fresh = timed_cosine(fresh_clock, warmup_steps=2)
    fresh.load_state_dict({k: v for k, v in saved.items() if k != "warmup_end_s"} | {"warmup_end_s": None})
    advance(fresh, fresh_clock, 5, 30.0)
    assert lr_of(fresh) != pytest.approx(lr_of(sched))


def test_max_time_gives_the_cosine_lightnings_timer_as_its_clock(corpus, tmp_path):
    """End to end without timing anything: trainer.max_time (and no step limit) makes CharLM's cosine read the
    Timer callback, (elapsed, remaining) = (0, the budget) before training starts; without max_time it has no
    clock, and an endless run without one is refused."""
    extra = ["trainer.max_epochs=-1", "optim.scheduler=cosine", "logger=none", "callbacks=no_logger"]
    _, model, trainer = build(
        compose_train(tiny_overrides(corpus, tmp_path / "t", *extra, "trainer.max_time=00:00:01:30"))
    )
    model.trainer = trainer
    sched = model.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert isinstance(sched, WarmupDecayLR) and sched.total_steps == math.inf and sched.clock is not None
    (timer,) = [c for c in trainer.callbacks if isinstance(c, Timer)]
    assert sched.clock() == (0.0, 90.0) and timer.time_remaining() == 90.0

    _, model, trainer = build(compose_train(tiny_overrides(corpus, tmp_path / "s", "trainer.max_steps=50")))
    model.trainer = trainer
    sched = model.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert sched.clock is None and sched.total_steps == 50

    _, model, trainer = build(compose_train(tiny_overrides(corpus, tmp_path / "e", *extra)))
    model.trainer = trainer
    with pytest.raises(UserError, match="optim.scheduler=cosine needs a finite run"):
        model.configure_optimizers()


def test_throughput_reports_characters_per_second_and_the_time_left(corpus, tmp_path):
    """With a clock that advances 0.5 s per step, 4 x 16 characters per step is 128 characters/s, and the time
    left is the steps left at 2 steps/s (every step is a logging step here)."""
    extra = ["trainer.max_epochs=1", "trainer.log_every_n_steps=1", "test=false", "sample_length=0"]
    cfg = compose_train(tiny_overrides(corpus, tmp_path, *extra))
    dm, model, trainer = build(cfg)
    (meter,) = [c for c in trainer.callbacks if isinstance(c, Throughput)]
    ticks = iter(range(10_000))
    meter.clock = lambda: next(ticks) * 0.5
    seen = []
    record = pl.Callback()
    record.on_train_batch_end = lambda tr, *_: seen.append(
        (tr.global_step, float(tr.callback_metrics["train/chars_per_s"]), float(tr.callback_metrics["train/eta_min"]))
    )
    trainer.callbacks.append(record)
    trainer.fit(model, datamodule=dm)
    total = trainer.estimated_stepping_batches
    assert len(seen) == total > 3
    for step, chars_per_s, eta_min in seen:
        assert chars_per_s == pytest.approx(4 * 16 * 2)
        assert eta_min == pytest.approx((total - step) / 2 / 60)


def test_per_step_metrics_are_logged_only_on_the_steps_lightning_writes(corpus, tmp_path, monkeypatch):
    """self.log costs ~0.6 ms even when Lightning drops the value, so the per-step scalars (loss, gradient norm,
    speed, time left) are logged only every trainer.log_every_n_steps steps, and TensorBoard still has them all."""
    extra = ["trainer.max_epochs=1", "trainer.log_every_n_steps=3", "test=false", "sample_length=0"]
    dm, model, trainer = build(compose_train(tiny_overrides(corpus, tmp_path, *extra)))
    calls: list[tuple[int, str]] = []
    log = pl.LightningModule.log

    def counting_log(self, name, *args, **kwargs):
        if self.trainer.training and not self.trainer.sanity_checking:
            calls.append((self.trainer.fit_loop.epoch_loop.batch_progress.total.ready, name))  # batch 1, 2, ...
        return log(self, name, *args, **kwargs)

    monkeypatch.setattr(pl.LightningModule, "log", counting_log)
    trainer.fit(model, datamodule=dm)
    batches = trainer.global_step
    assert batches > 6
    per_step = ("train/loss_step", "train/grad_norm", "train/chars_per_s", "train/eta_min", "train/chars_seen")
    logged = set(range(3, batches + 1, 3))
    for name in per_step:
        assert sorted(b for b, n in calls if n == name) == sorted(logged), name
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    # TensorBoard's steps count from 0
    for tag in ("2_train/loss_step", "3_optim/grad_norm", "3_optim/chars_per_s", "3_optim/chars_seen"):
        assert [e.step + 1 for e in acc.Scalars(tag)] == sorted(logged), tag


@pytest.mark.parametrize("name", ["adamw", "adam"])
def test_adam_runs_torchs_fused_kernel_on_cpu_and_matches_the_loop(name):
    """The fused kernel (4x faster for a 2x128 LSTM on 2 CPU cores) takes the same steps as torch's loop."""
    torch.manual_seed(0)
    cfg = OptimConfig(optimizer=name, lr=0.01, weight_decay=0.1)
    fast, ref = (CharLM(CharVocab.from_text("abcdefgh").to_dict(), hidden_size=16, dropout=0.0) for _ in range(2))
    ref.load_state_dict(fast.state_dict())
    opt = cfg.make_optimizer(fast.parameters())
    assert opt.param_groups[0]["fused"] is True
    ref_opt = (torch.optim.Adam if name == "adam" else torch.optim.AdamW)(
        ref.parameters(), lr=0.01, betas=cfg.betas, weight_decay=0.1, foreach=False
    )
    x = torch.randint(0, 8, (3, 12))
    for _ in range(5):
        for model, o in ((fast, opt), (ref, ref_opt)):
            o.zero_grad()
            logits, _ = model(x)
            F.cross_entropy(logits.reshape(-1, 8), x.reshape(-1)).backward()
            o.step()
    for p, q in zip(fast.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert not OptimConfig(optimizer="sgd").make_optimizer(fast.parameters()).param_groups[0].get("fused")
