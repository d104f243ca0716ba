"""The benchmark scripts run end to end on tiny inputs and report sane numbers; the Optuna searches compose."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import OmegaConf

from bench.finetune import first_reach
from bench.quality import experiments, lightning_time
from bench.tokenize_speed import NON_ASCII, build_corpus
from charlm import UserError
from charlm.config import compose
from charlm.data.vocab import CharVocab
from charlm.info import describe, machine_info
from charlm.nn.rnn import CELLS, RNNConfig, RNNStack
from charlm.nn.stepper import Stepper
from tests.conftest import ROOT, assert_user_error, make_text, run_module, tiny_overrides

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_build_corpus_writes_whole_lines_of_every_script(tmp_path):
    path = tmp_path / "corpus.txt"
    written = build_corpus(path, 300_000)
    raw = path.read_bytes()
    assert len(raw) == written and 290_000 < written <= 300_000
    text = raw.decode("utf-8")  # whole lines only: no character cut in half
    assert text.endswith("\n") and "Time Traveller" in text and "First Citizen" in text
    assert all(line in text for line in NON_ASCII)


def test_tokenize_speed_reports_first_run_and_cached_reload(tmp_path):
    out = tmp_path / "tokenize.json"
    proc = run_module(
        "bench.tokenize_speed", "--mb", "1", "--repeats", "1", "--tmp-dir", str(tmp_path), "--json", str(out)
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (
        proc.stdout.startswith(describe(machine_info()).splitlines()[0])
        and "first run" in proc.stdout
        and "cached reload" in proc.stdout
    )
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["machine"]["torch_threads"] >= 1 and report["machine"]["torch"]
    # the corpus the benchmark built and tokenized is the one build_corpus builds: every character counted once
    written = build_corpus(tmp_path / "same.txt", 1_000_000)
    text = (tmp_path / "same.txt").read_text(encoding="utf-8")
    vocab = len(set(text) | {"\ufffd"})  # and the unknown-character token
    counted = {"bytes": written, "characters": len(text), "vocab_size": vocab, "dtype": "uint8"}
    assert report["corpus"] == counted | {"preprocess": "none", "repeats": 1}
    for stage in ("first_run", "cached"):
        r = report["results"][stage]
        (run,) = r["runs"]
        assert (run["characters"], run["vocab_size"], run["cache_hit"]) == (len(text), vocab, stage == "cached")
        # the figures are the measured run's, over the corpus's bytes, judged against the stated targets
        assert r["seconds"] == run["seconds"] and r["mb_per_s"] == pytest.approx(written / 1e6 / run["seconds"])
        above = run["peak_rss"] - run["baseline_rss"]
        assert r["above_baseline_mb"] == pytest.approx(above / 1e6)
        assert r["above_baseline_per_corpus"] == pytest.approx(above / written)
        assert r["peak_rss_mb"] >= r["baseline_rss_mb"] > 10  # the baseline holds torch and Lightning
        assert r["meets_speed"] == (r["mb_per_s"] >= report["targets"]["mb_per_s"])
        assert r["meets_memory"] == (r["above_baseline_per_corpus"] <= report["targets"]["above_baseline_per_corpus"])
    assert not list(tmp_path.glob("charlm-bench-*")), "the temporary corpus and caches are removed"


def test_tokenize_speed_refuses_a_bad_size(tmp_path):
    assert_user_error(run_module("bench.tokenize_speed", "--mb", "0", "--json", str(tmp_path / "x.json")), "--mb")


def write_events(run_dir: Path, bpc: list[float], tag: str = "val/bpc") -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir))
    start = time.time()
    for i, value in enumerate(bpc):
        writer.add_scalar(tag, value, global_step=10 * (i + 1), walltime=start + 30.0 * (i + 1))
    writer.close()


def test_run_events_reads_scalars_against_seconds_since_the_first_event(tmp_path):
    from bench.events import RunEvents

    write_events(tmp_path / "run", [3.0, 2.5, 2.2])
    run = RunEvents(tmp_path / "run")
    write_events(tmp_path / "old" / "tb", [3.0])  # where train.py wrote them before runs held them themselves
    assert run.dir == tmp_path / "run" and RunEvents(tmp_path / "old").dir == tmp_path / "old" / "tb"
    assert run.values("val/bpc") == pytest.approx([3.0, 2.5, 2.2])
    assert run.seconds("val/bpc") == pytest.approx([30.0, 60.0, 90.0], abs=1.0)
    with pytest.raises(UserError, match="val/loss"):
        run.scalars("val/loss")


def test_plot_curves_writes_a_png_with_one_line_per_run(tmp_path):
    pytest.importorskip("matplotlib")
    write_events(tmp_path / "lstm", [3.0, 2.5, 2.2])
    write_events(tmp_path / "gru", [3.1, 2.4])
    out = tmp_path / "docs" / "curves.png"
    proc = run_module(
        "bench.plot_curves",
        "--run",
        f"LSTM={tmp_path / 'lstm'}",
        "--run",
        str(tmp_path / "gru"),
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.read_bytes().startswith(PNG_SIGNATURE) and out.stat().st_size > 10_000
    assert "LSTM: 3 points, last 2.2000 bpc" in proc.stdout and "gru: 2 points" in proc.stdout


def test_plot_curves_refuses_a_dir_without_events_or_without_val_bpc(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_module("bench.plot_curves", "--run", f"x={tmp_path / 'empty'}", "--out", str(tmp_path / "x.png"))
    assert_user_error(proc, "no TensorBoard event files")
    write_events(tmp_path / "no_val", [4.0], tag="train/loss")
    proc = run_module("bench.plot_curves", "--run", str(tmp_path / "no_val"), "--out", str(tmp_path / "x.png"))
    assert_user_error(proc, "'val/bpc'")
    assert not (tmp_path / "x.png").exists()


def test_quality_formats_lightning_max_time_and_checks_experiment_names():
    assert [lightning_time(s) for s in (1, 90, 3600, 90061)] == [
        "00:00:00:01",
        "00:00:01:30",
        "00:01:00:00",
        "01:01:01:01",
    ]
    assert experiments(["default,shakespeare", "zaremba_small"]) == ["default", "shakespeare", "zaremba_small"]
    with pytest.raises(UserError, match="no conf/experiment/nope.yaml"):
        experiments(["nope"])


@pytest.mark.slow
def test_quality_trains_for_a_fixed_time_and_reads_back_val_and_test_loss(tmp_path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text(make_text(), encoding="utf-8")
    overrides = [o for o in tiny_overrides(corpus, tmp_path) if not o.startswith("paths.output_dir")]
    out = tmp_path / "quality.json"
    args = ["--experiment", "default", "--max-time", "60", "--out-dir", str(tmp_path / "runs"), "--json", str(out)]
    proc = run_module("bench.quality", *args, *(f"--override={o}" for o in overrides))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = json.loads(out.read_text(encoding="utf-8"))["runs"]
    assert run["val_points"] == 2 and run["epochs"] == 2  # tiny_overrides: max_epochs=2 comes before 60 s
    assert 0 < run["val_loss_best"] <= run["val_loss_last"] < 10
    assert run["val_bpc_last"] == pytest.approx(run["val_loss_last"] / 0.6931471805599453, rel=1e-4)
    assert run["wall_seconds"] > 0 and list((tmp_path / "runs/default").glob("events.*"))
    assert 0 < run["test_loss"] < 10 and run["test_bpc"] == pytest.approx(run["test_loss"] / math.log(2), rel=1e-4)


SEARCHES = {
    "timemachine_optuna": [],
    "shakespeare_optuna": ["experiment=shakespeare"],
    "shakespeare_1min_optuna": ["experiment=shakespeare_1min"],
    "shakespeare_5min_optuna": ["experiment=shakespeare_5min"],
    "shakespeare_1min_shapes_optuna": ["experiment=shakespeare_1min_fp32"],
}


def test_every_shipped_search_is_checked_below():
    assert set(SEARCHES) == {p.stem for p in (ROOT / "conf/hparams_search").glob("*.yaml")}


@pytest.mark.parametrize("search", sorted(SEARCHES))
def test_optuna_search_composes_and_every_point_of_its_space_fits_the_corpus(search, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override

    overrides = [f"hparams_search={search}", *SEARCHES[search], f"paths.cache_dir={tmp_path}"]
    cfg = compose(overrides, return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and sweeper.direction == "minimize"
    assert cfg.hydra.mode == RunMode.MULTIRUN and cfg.optimized_metric == "val/loss"
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in sweeper.params.items()])
    spaces = {o.get_key_element(): create_optuna_distribution_from_override(o) for o in parsed}
    for key in spaces:
        assert OmegaConf.select(cfg, key, default="missing") != "missing", f"{key} is not a config key"
    cell = spaces["model.cell"]  # a distribution, or one fixed value (shakespeare_5min_optuna: lstm)
    assert set(getattr(cell, "choices", [cell])) <= set(CELLS)
    # The largest batch and window of the space still fit every split of the corpus.
    cfg.data.batch_size, cfg.data.seq_len = max(spaces["data.batch_size"].choices), max(spaces["data.seq_len"].choices)
    instantiate(cfg.data).check_sizes()


def test_cells_benchmark_reports_fused_and_scratch(tmp_path):
    out = tmp_path / "cells.json"
    args = ["--cells", "lstm", "gru", "--hidden", "16", "--batch", "4", "--seq-len", "8", "--steps", "1"]
    proc = run_module("bench.cells", *args, "--repeats", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "scratch / fused" in proc.stdout
    rows = json.loads(out.read_text())["results"]
    assert [(r["cell"], r["hidden"]) for r in rows] == [("lstm", 16), ("gru", 16)]
    for r in rows:
        assert r["fused_chars_per_s"] > 0 and r["ratio"] == pytest.approx(
            r["scratch_chars_per_s"] / r["fused_chars_per_s"]
        )


def test_sampling_benchmark_covers_every_sampler_and_skips_what_is_too_costly(tmp_path):
    out = tmp_path / "sampling.json"
    args = ["--hidden", "16", "--streams", "1", "3", "--lengths", "5", "40", "--naive-budget", "500"]
    beams = ["--beams", "1", "3", "--beam-length", "12"]
    proc = run_module("bench.sampling", *args, *beams, "--fused-step-max-length", "10", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    beam = json.loads(out.read_text())["beam"]
    assert [r["beam"] for r in beam] == [1, 3] and all(
        r["chars_per_s"] == pytest.approx(12 / r["seconds"]) for r in beam
    )
    rows = {(r["sampler"], r["streams"], r["length"]): r for r in json.loads(out.read_text())["results"]}
    assert len(rows) == 4 * 2 * 2
    assert all(r["seconds"] > 0 for (name, _, _), r in rows.items() if name in ("charlm", "charlm int8"))
    assert rows[("fused step", 1, 40)]["seconds"] is None and rows[("fused step", 3, 5)]["seconds"] > 0
    assert rows[("naive", 3, 40)]["seconds"] is None  # 3 * 40^2 / 2 > 500
    r = rows[("charlm", 3, 40)]
    assert 0 < r["first_char_ms"] / 1e3 < r["seconds"]
    assert r["ms_per_step"] == pytest.approx(1e3 * (r["seconds"] - r["first_char_ms"] / 1e3) / 39)  # after the first
    assert r["chars_per_s"] == pytest.approx(3 / (r["ms_per_step"] / 1e3))


def test_score_speed_benchmark_times_each_stream_count(tmp_path):
    out = tmp_path / "score.json"
    args = ["--hidden", "16", "--max-chars", "2000", "--streams", "1", "4", "--repeats", "1", "--json", str(out)]
    proc = run_module("bench.score_speed", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["results"]
    assert [r["streams"] for r in rows] == [1, 4] and all(
        r["chars_per_s"] == pytest.approx(2000 / r["seconds"]) for r in rows
    )
    assert rows[0]["nats_per_char"] != rows[1]["nats_per_char"]  # streams 2 to 4 start from a zero state


def test_throughput_benchmark_compares_charlm_with_a_plain_loop(tmp_path):
    out = tmp_path / "throughput.json"
    args = ["--hidden", "16", "--batch", "4", "--seq-len", "8", "--steps", "2", "--warmup", "1", "--pairs", "2"]
    proc = run_module("bench.throughput", *args, "--override", f"paths.cache_dir={tmp_path}", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())["results"]
    pairs = result["pairs"]  # two: the second trains into the first one's scratch directory
    assert len(pairs) == 2 and all(p["charlm_chars_per_s"] > 0 and p["plain_chars_per_s"] > 0 for p in pairs)
    assert result["median_ratio"] == pytest.approx((pairs[0]["ratio"] + pairs[1]["ratio"]) / 2)
    # 2 LSTM layers of 16 over a 16-wide embedding; a 66-way decoder (Tiny Shakespeare's 65 characters + unk)
    assert result["flops_per_char"] == 2 * 24 * 16 * 32 + 6 * 16 * 66
    assert result["matmul_peak_gflops"] > 0


def test_the_int8_quality_check_measures_the_forward_passs_bits():
    from bench.sampling import stepped_bits
    from charlm.training.module import CharLM

    torch.manual_seed(0)
    text = make_text(400)
    model = CharLM(CharVocab.from_text(text).to_dict(), hidden_size=32).eval()
    ids = torch.from_numpy(model.vocab.encode(text).astype("int64"))[None]
    with torch.no_grad():
        logits, _ = model.net(ids[:, :-1])
    want = torch.nn.functional.cross_entropy(logits[0], ids[0, 1:]).item() / math.log(2)
    assert stepped_bits(model, text, "none") == pytest.approx(want, rel=1e-5)
    assert stepped_bits(model, text, "int8") == pytest.approx(want, abs=0.05)


def test_the_study_table_lists_completed_trials_best_first_then_the_failed(tmp_path):
    optuna = pytest.importorskip("optuna")
    from bench.study import main

    storage = f"sqlite:///{tmp_path}/s.db"
    study = optuna.create_study(study_name="s", storage=storage)
    cell = optuna.distributions.CategoricalDistribution(["lstm", "mingru"])
    for value, name in ((1.7, "lstm"), (1.5, "mingru"), (None, "lstm")):
        state = optuna.trial.TrialState.COMPLETE if value else optuna.trial.TrialState.FAIL
        trial = optuna.trial.create_trial(
            params={"model.cell": name}, distributions={"model.cell": cell}, value=value, state=state
        )
        study.add_trial(trial)
    out = tmp_path / "study.md"
    main(["--storage", storage, "--study", "s", "--out", str(out), "--title", "# title"])
    lines = out.read_text().splitlines()
    assert lines[0] == "# title" and lines[2] == "3 trials (2 complete, 1 fail)."
    body = [line.split(" | ")[1:3] for line in lines[6:]]
    assert body == [["COMPLETE", "1.5000"], ["COMPLETE", "1.7000"], ["FAIL", "-"]]
    assert lines[6].endswith("| mingru |")


def test_a_second_round_starts_with_the_first_rounds_best_trials(tmp_path):
    """A first round that searched model.lr (the learning rate's old key): the second round's optim.lr starts
    from its best values."""
    optuna = pytest.importorskip("optuna")
    from bench.study import main

    storage = f"sqlite:///{tmp_path}/s.db"
    first = optuna.create_study(study_name="r1", storage=storage)
    lr = optuna.distributions.LogUniformDistribution(1e-3, 1e-1)
    for value in (1.7, 1.5, 1.6):
        first.add_trial(
            optuna.trial.create_trial(params={"model.lr": value / 100}, distributions={"model.lr": lr}, value=value)
        )
    main(["--storage", storage, "--study", "r2", "--seed-from", "r1", "--top", "2"])
    second = optuna.load_study(study_name="r2", storage=storage)
    asked = [second.ask() for _ in range(2)]  # as the Hydra sweeper does: ask, then suggest each searched key
    assert [t.suggest_float("optim.lr", 1e-3, 1e-1, log=True) for t in asked] == [0.015, 0.016]
    with pytest.raises(SystemExit):  # nothing completed to seed from
        main(["--storage", storage, "--study", "r3", "--seed-from", "r2"])


@pytest.mark.slow  # Inductor compiles C++: ~1 minute
def test_the_compiled_sampler_rows_run_the_stepper_they_name_and_draw_what_generate_draws():
    from bench.sampling import VOCAB, compiled_stepper, run_charlm, run_compiled, run_int8

    torch.manual_seed(0)
    net = RNNStack(len(VOCAB), RNNConfig(hidden_size=16)).eval()
    ids, state = torch.tensor([1, 7]), torch.randn(2, 2, 2, 16)
    exact = Stepper(net)(ids, state)[0]
    for quantize, run_eager in (("none", run_charlm), ("int8", run_int8)):
        with torch.inference_mode():
            want, got = Stepper(net, quantize)(ids, state)[0], compiled_stepper(net, quantize)(ids, state)[0]
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert torch.equal(want, exact) == (quantize == "none")
        eager = torch.cat(list(run_eager(net, 2, 30, torch.Generator().manual_seed(1))))
        drawn = torch.cat(list(run_compiled(quantize)(net, 2, 30, torch.Generator().manual_seed(1))))
        assert drawn.tolist() == eager.tolist()


def test_step_overhead_benchmark_times_the_optimisers_and_the_logging(tmp_path):
    out = tmp_path / "step_overhead.json"
    args = ["--hidden", "16", "--batch", "4", "--seq-len", "8", "--updates", "3", "--repeats", "1"]
    args += ["--steps", "9", "--warmup", "1", "--pairs", "1", "--override", f"paths.cache_dir={tmp_path}"]
    proc = run_module("bench.step_overhead", *args, "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(describe(machine_info()).splitlines()[0])  # charlm-info's block first
    result = json.loads(out.read_text())["results"]
    assert set(result["optimizer_median_seconds"]) == {"loop", "foreach", "fused"}
    assert all(s > 0 for s in result["optimizer_median_seconds"].values())
    every, tenth = sorted(result["runs"], key=lambda r: r["log_every_n_steps"])
    # 10 steps: the four per-step scalars on each step when every step is logged, else on the tenth (+ epoch end)
    assert every["log_calls_per_step"] >= 4 and tenth["log_calls_per_step"] < 1.5
    assert every["ms_per_step"] > 0 and tenth["chars_per_s"] > 0


def test_finetune_reports_the_first_time_a_curve_reaches_the_target():
    seconds, values = [1.0, 2.0, 3.0, 4.0], [2.5, 2.1, 1.9, 1.8]
    assert first_reach(seconds, values, 2.0) == 3.0 and first_reach(seconds, values, 1.9) == 3.0
    assert first_reach(seconds, values, 1.0) is None


@pytest.mark.slow  # three 10 s training runs
def test_finetune_quick_runs_end_to_end_with_a_plot_and_both_curves(tmp_path):
    proc = run_module("bench.finetune", "--quick", "--out-dir", str(tmp_path / "runs"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "runs" / "finetune.json").read_text())
    assert set(report["runs"]) == {"scratch", "fine-tuned"} and report["source_seconds"] > 0
    assert all(r["val_points"] >= 2 for r in report["runs"].values())
    assert (tmp_path / "runs" / "finetune_vs_scratch.png").stat().st_size > 0
    assert "fine-tuned reaches scratch's final val loss" in proc.stdout
