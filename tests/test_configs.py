"""Every shipped config builds the objects it describes: the values the code runs with are the values the configs
(and the README) state, the Python defaults and the default run are one and the same, sweeps run, and each
trainer preset sets what it claims."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from pytorch_lightning.accelerators import CPUAccelerator
from pytorch_lightning.callbacks import LearningRateMonitor, Timer
from pytorch_lightning.strategies import DDPStrategy

import charlm.config
from charlm import UserError
from charlm.config import DATA_DIR, build, compose
from charlm.data.datamodule import CharDataModule
from charlm.infer.generation import GenerationConfig
from charlm.nn.rnn import CELLS, RNNConfig
from charlm.training.callbacks import TextSample
from charlm.training.module import CharLM
from charlm.training.optim import OptimConfig
from tests.conftest import (
    ROOT,
    compose_generate,
    compose_train,
    dropout_search,
    make_text,
    run_cli,
    run_module,
    run_python,
    run_train,
    split_record,
    tiny_overrides,
)

EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf/experiment").glob("*.yaml"))
SETTINGS = {"rnn_cfg": RNNConfig, "optim_cfg": OptimConfig}
DATA_SETTINGS = ("path", "preprocess", "splits", "batch_size", "seq_len", "eval_batch_size", "batch_order", "unk")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One token cache for the module: each shipped corpus is tokenized once."""
    return tmp_path_factory.mktemp("cache")


def plain(cfg) -> dict:
    """A config node as plain data, without Hydra's ``_target_`` / ``_convert_``."""
    return {k: v for k, v in OmegaConf.to_container(cfg, resolve=True).items() if not k.startswith("_")}


def assert_model_is_the_config(model: CharLM, cfg, vocab: dict) -> None:
    """``model.*`` are RNNConfig's fields and ``optim.*`` OptimConfig's: nothing dropped, nothing extra."""
    assert set(plain(cfg.model)) == {f.name for f in fields(RNNConfig)}
    assert set(plain(cfg.optim)) == {f.name for f in fields(OptimConfig)}
    settings = plain(cfg.model) | plain(cfg.optim)
    for attr, cls in SETTINGS.items():
        built = asdict(getattr(model, attr))
        assert built == {f.name: settings[f.name] for f in fields(cls)} | (
            {"betas": tuple(settings["betas"])} if cls is OptimConfig else {}
        )
    origin = {"init_from": None, "freeze": "none"}  # a run not started from another run's weights
    assert dict(model.hparams) == {"vocab": vocab, **settings, **origin}  # what a checkpoint rebuilds the model from
    net, m = model.net, cfg.model
    layer_cls = CELLS[m.cell].fused[0] if m.impl == "fused" and CELLS[m.cell].fused else None
    assert (net.cell, net.num_layers, net.hidden_size, len(net.layers)) == (
        m.cell,
        m.num_layers,
        m.hidden_size,
        m.num_layers,
    )
    assert layer_cls is None or all(type(layer) is layer_cls for layer in net.layers)
    emb = m.hidden_size if m.embedding_size is None else m.embedding_size
    assert (net.embedding is None) == (emb == 0) and (emb == 0 or net.embedding.embedding_dim == emb)
    assert net.drop.p == m.dropout and (net.decoder.weight is getattr(net.embedding, "weight", None)) == m.tie_weights
    if m.init_scale is not None:
        assert max(float(p.abs().max()) for p in net.parameters()) <= m.init_scale


def assert_data_is_the_config(dm: CharDataModule, data_cfg) -> None:
    settings = plain(data_cfg)
    for name in DATA_SETTINGS:
        expected = tuple(settings[name]) if name == "splits" else settings[name]
        assert getattr(dm, name) == expected, name


def assert_trainer_is_the_config(trainer, trainer_cfg) -> None:
    t = plain(trainer_cfg)
    for name in (
        "max_epochs",
        "max_steps",
        "gradient_clip_val",
        "gradient_clip_algorithm",
        "precision",
        "log_every_n_steps",
        "num_sanity_val_steps",
        "val_check_interval",
        "limit_train_batches",
        "limit_val_batches",
        "limit_test_batches",
        "check_val_every_n_epoch",
        "default_root_dir",
    ):
        assert getattr(trainer, name) == t[name], name
    assert trainer.num_devices == t["devices"]
    on_cpu = t["accelerator"] == "cpu" or (t["accelerator"] == "auto" and not torch.cuda.is_available())
    assert not on_cpu or isinstance(trainer.accelerator, CPUAccelerator)
    timers = [c._duration for c in trainer.callbacks if isinstance(c, Timer)]
    if t["max_time"] is None:
        assert timers == []
    else:
        d, h, m, s = (int(x) for x in t["max_time"].split(":"))
        assert timers == [((d * 24 + h) * 60 + m) * 60 + s]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_builds_what_its_config_says(experiment, tmp_path, cache_dir):
    cfg = compose_train([f"experiment={experiment}", f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}"])
    dm, model, trainer = build(cfg)
    assert model.net.vocab_size == len(dm.vocab)
    assert_model_is_the_config(model, cfg, dm.vocab.to_dict())
    assert_data_is_the_config(dm, cfg.data)
    assert (dm.cache_dir, dm.seed) == (str(cache_dir), cfg.seed)
    assert_trainer_is_the_config(trainer, cfg.trainer)
    (shown,) = [c for c in trainer.callbacks if isinstance(c, TextSample)]
    assert (shown.prompt, shown.length, shown.seed) == (
        cfg.callbacks.text_sample.prompt,
        cfg.callbacks.text_sample.length,
        cfg.seed,
    )


def test_d2l_preset_is_the_d2l_recipe(tmp_path, cache_dir):
    cfg = compose_train(["experiment=d2l_deep_gru", f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}"])
    m, d, o = cfg.model, cfg.data, cfg.optim
    assert (m.cell, m.num_layers, m.hidden_size, m.embedding_size, o.optimizer, o.lr) == ("gru", 2, 32, 0, "sgd", 2.0)
    assert o.scheduler == "none"
    assert (d.batch_size, d.seq_len, d.preprocess, cfg.trainer.gradient_clip_val) == (1024, 32, "d2l", 1.0)
    dm = instantiate(d)
    assert len(dm.vocab) == 28


# ---- one default, typed once in Python: the default run is CharLM(vocab) on CharDataModule(path) ----


def test_the_default_run_builds_charlm_with_no_settings(tmp_path, cache_dir):
    """``charlm-train`` with no overrides builds ``CharLM(vocab)``: same hyperparameters, same parameters."""
    cfg = compose_train([f"paths.output_dir={tmp_path}", f"paths.cache_dir={cache_dir}"])
    dm, configured, trainer = build(cfg)
    vocab = dm.vocab.to_dict()
    bare = CharLM(vocab)
    assert dict(configured.hparams) == dict(bare.hparams)
    assert configured.rnn_cfg == bare.rnn_cfg == RNNConfig() and configured.optim_cfg == bare.optim_cfg == OptimConfig()
    shapes = [(name, p.shape) for name, p in bare.named_parameters()]
    assert [(name, p.shape) for name, p in configured.named_parameters()] == shapes
    assert_model_is_the_config(bare, cfg, vocab)
    assert_trainer_is_the_config(trainer, cfg.trainer)


# Run in a fresh process: it changes two defaults in Python before charlm.config (which builds the config nodes
# from them) is imported, then prints what the default config holds and what it builds.
CHANGED_DEFAULTS = """
import inspect, json, sys
from charlm.data.datamodule import CharDataModule
from charlm.nn.rnn import RNNConfig

init = CharDataModule.__init__
named = [p.name for p in inspect.signature(init).parameters.values() if p.default is not p.empty]
init.__defaults__ = tuple(24 if name == "batch_size" else d for name, d in zip(named, init.__defaults__, strict=True))
RNNConfig.__init__.__kwdefaults__["hidden_size"] = 48

from hydra.utils import instantiate
from charlm.config import compose

cfg = compose([f"paths.output_dir={sys.argv[1]}", f"paths.cache_dir={sys.argv[1]}"])
dm, model = instantiate(cfg.data), instantiate(cfg.model, vocab={"chars": "ab", "unk": None})
composed = {"batch_size": cfg.data.batch_size, "seq_len": cfg.data.seq_len, "hidden_size": cfg.model.hidden_size}
built = {"batch_size": dm.batch_size, "seq_len": dm.seq_len, "hidden_size": model.net.hidden_size}
print(json.dumps({"path": cfg.data.path, "composed": composed, "built": built}))
"""


def test_a_default_changed_in_python_is_the_default_a_user_composes_and_builds(tmp_path):
    """No yaml file restates a default: data.batch_size and model.hidden_size changed in CharDataModule's signature
    and in RNNConfig are what charlm-train's default config holds and what it builds; the rest stays."""
    proc = run_python(CHANGED_DEFAULTS, str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["composed"] == seen["built"] == {"batch_size": 24, "seq_len": 64, "hidden_size": 48}
    assert seen["path"] == str(DATA_DIR / "timemachine.txt")


def test_the_default_run_is_the_one_the_readme_measured(tmp_path):
    """README, results: "default: 2x256 LSTM, tied embeddings, dropout 0.3, AdamW 4e-3 with warm-up and cosine,
    batch 32 x 64, 30 epochs" on The Time Machine. A changed default in RNNConfig, OptimConfig or CharDataModule
    changes that run."""
    cfg = compose_train([f"paths.output_dir={tmp_path}"])
    m, d, o = cfg.model, cfg.data, cfg.optim
    assert (m.cell, m.num_layers, m.hidden_size, m.embedding_size, m.dropout) == ("lstm", 2, 256, None, 0.3)
    assert (m.tie_weights, o.weight_decay) == (True, 0.0)
    assert (o.optimizer, o.lr, o.scheduler, o.warmup_steps, o.min_lr) == ("adamw", 0.004, "cosine", 20, 0.0)
    assert (d.batch_size, d.seq_len, d.eval_batch_size, d.batch_order, d.preprocess) == (32, 64, 16, "tbptt", "none")
    assert list(d.splits) == [0.9, 0.05, 0.05] and Path(d.path).name == "timemachine.txt"
    assert (cfg.trainer.max_epochs, cfg.trainer.gradient_clip_val, cfg.trainer.max_time) == (30, 1.0, None)


def test_every_sampler_uses_the_sampling_defaults(tmp_path):
    """charlm-generate, the TensorBoard sample and the sample printed after training all draw with
    GenerationConfig()'s temperature, top_k and top_p unless told otherwise."""
    default = asdict(GenerationConfig())
    generate_cfg = compose_generate([])
    assert {name: generate_cfg[name] for name in default} == default
    train_cfg = compose_train([f"paths.output_dir={tmp_path}"])
    assert instantiate(train_cfg.callbacks.text_sample).settings == GenerationConfig()
    told = compose_generate(["temperature=0.5", "top_k=3", "top_p=0.9", "stop=ab"])
    assert {name: told[name] for name in default} == {"temperature": 0.5, "top_k": 3, "top_p": 0.9, "stop": "ab"}


def test_moved_settings_keep_their_old_keys_with_a_notice(tmp_path, monkeypatch, capsys):
    """``model.lr`` and the other optimiser settings moved to ``optim.*``, ``data.sampling`` to
    ``data.batch_order``: an old key set by an override or by a config file still takes effect (over the new
    key's value), with one line on stderr, and leaves no copy behind."""
    monkeypatch.setattr(charlm.config, "_noticed", set())
    (tmp_path / "conf/experiment").mkdir(parents=True)
    (tmp_path / "conf/experiment/mine.yaml").write_text("# @package _global_\nmodel:\n  warmup_steps: 7\n")
    search = f"hydra.searchpath=[file://{tmp_path / 'conf'}]"
    old = ["model.lr=0.01", "optim.lr=0.5", "model.betas=[0.8,0.9]", "data.sampling=random"]
    cfg = compose_train([search, "experiment=mine", *old])
    assert (cfg.optim.lr, list(cfg.optim.betas), cfg.optim.warmup_steps) == (0.01, [0.8, 0.9], 7)
    assert cfg.data.batch_order == "random" and "sampling" not in cfg.data
    assert not {"lr", "betas", "warmup_steps", "scheduler"} & set(cfg.model)
    moved = [("data.sampling", "data.batch_order")]
    moved += [(f"model.{k}", f"optim.{k}") for k in ("betas", "lr", "warmup_steps")]
    assert sorted(capsys.readouterr().err.splitlines()) == [f"note: {a} is now {b}; {a} still works" for a, b in moved]
    assert compose_train(["model=rnn"]).optim.lr == 0.001  # a model preset sets the rate its cell needs
    assert capsys.readouterr().err == ""
    untouched = compose_train([])
    assert untouched.optim == compose_train(["optim=adamw"]).optim and "lr" not in untouched.model


# ---- the other groups ----

PRESETS = {  # what each conf/trainer/*.yaml says it sets
    "default": {"accelerator": "auto", "devices": 1, "strategy": None},
    "cpu": {"accelerator": "cpu", "devices": 1, "strategy": None},
    "gpu": {"accelerator": "gpu", "devices": 1, "strategy": None},
    "ddp": {"accelerator": "gpu", "devices": -1, "strategy": "ddp"},  # every visible GPU
    "ddp_cpu": {"accelerator": "cpu", "devices": 2, "strategy": "gloo"},
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_trainer_presets_set_what_they_claim(preset, tmp_path):
    cfg = compose_train([f"trainer={preset}", f"paths.output_dir={tmp_path}"])
    t, claim = cfg.trainer, PRESETS[preset]
    assert t._target_ == "pytorch_lightning.Trainer"
    assert (t.accelerator, t.devices) == (claim["accelerator"], claim["devices"])
    strategy = t.get("strategy")
    if claim["strategy"] == "gloo":
        assert strategy._target_ == "pytorch_lightning.strategies.DDPStrategy"
        assert strategy.process_group_backend == "gloo"
    else:
        assert strategy == claim["strategy"]
    # The rest is the default preset's (clipping, epochs, precision ...).
    default = plain(compose_train([f"paths.output_dir={tmp_path}"]).trainer)
    rest = {k: v for k, v in plain(t).items() if k not in ("accelerator", "devices", "strategy", "precision")}
    assert rest == {k: v for k, v in default.items() if k not in ("accelerator", "devices", "strategy", "precision")}
    if claim["accelerator"] == "gpu" and not torch.cuda.is_available():
        return  # a GPU Trainer cannot be built here; the composed values above are what it would get
    trainer = instantiate(t, logger=False)
    if claim["devices"] != -1:
        assert_trainer_is_the_config(trainer, t)
    if claim["strategy"] is not None:
        assert isinstance(trainer.strategy, DDPStrategy)
    if claim["strategy"] == "gloo":
        assert trainer.strategy.process_group_backend == "gloo" and trainer.num_devices == 2
        assert isinstance(trainer.accelerator, CPUAccelerator)


def test_logger_none_builds_a_run_without_a_logger_or_its_lr_monitor(corpus, tmp_path):
    cfg = compose_train(tiny_overrides(corpus, tmp_path / "run", "logger=none"))
    assert plain(cfg.logger) == {}
    _, _, trainer = build(cfg)
    assert trainer.loggers == [] and not [c for c in trainer.callbacks if isinstance(c, LearningRateMonitor)]
    _, _, trainer = build(compose_train(tiny_overrides(corpus, tmp_path / "logged")))
    assert [type(lg).__name__ for lg in trainer.loggers] == ["CurvesFirstLogger"]  # a TensorBoardLogger
    assert [c for c in trainer.callbacks if isinstance(c, LearningRateMonitor)]


def test_multirun_sweep_trains_each_point(tmp_path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text(make_text(), encoding="utf-8")
    overrides = [
        o
        for o in tiny_overrides(corpus, tmp_path, "trainer.max_epochs=1", "test=false", "sample_length=0")
        if not o.startswith(("paths.output_dir", "model.hidden_size", "optim.lr"))
    ]
    proc = run_cli("train.py", "-m", "model.hidden_size=8", "model.lr=0.02,0.03", *overrides, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("note: model.lr is now optim.lr; model.lr still works") == 1  # the old key sweeps too
    # the sweep's directory, multirun.yaml included, is named as its jobs are: no outputs/multirun/run/
    (sweep,) = (tmp_path / "outputs/multirun/tiny").iterdir()
    assert [p.name for p in (tmp_path / "outputs/multirun").iterdir()] == ["tiny"] and (
        sweep / "multirun.yaml"
    ).is_file()
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and p.name[0].isdigit())
    # each job's directory says what it is: its number and overrides, shortened, without the paths
    assert [j.split("_", 1)[0] for j in jobs] == ["0", "1"]
    assert "lr=0.02" in jobs[0].split(",") and "lr=0.03" in jobs[1].split(",") and "data.path" not in jobs[0]
    for job in jobs:
        saved = torch.load(sweep / job / "checkpoints/last.ckpt", weights_only=True)["hyper_parameters"]
        assert f"lr={saved['lr']}" in job.split(",") and saved["hidden_size"] == 8
        assert list((sweep / job).glob("events.*"))


def help_examples(text: str, script: str) -> list[list[str]]:
    """The overrides of each ``python SCRIPT ...`` example line of a --help text; a sweep (-m) runs its first point."""
    examples = []
    for line in text.splitlines():
        if line.strip().startswith(f"python {script} "):
            args = shlex.split(re.split(r"\s{2,}", line.strip())[0])[2:]  # two or more spaces: then a comment
            examples.append([re.sub(r"=([^,]+),.*", r"=\1", a) for a in args if a != "-m"])
    return examples


HELP = {  # the command, how its --help starts, a setting it lists
    "train": (("train.py",), "charlm-train (python train.py): train a character-level language model", "  model:"),
    "generate": (
        ("generate.py",),
        "charlm-generate (python generate.py): sample text from a checkpoint",
        "temperature: 0.8",
    ),
    "score": (
        ("-m", "charlm.score"),
        "charlm-score (python -m charlm.score): the log-probability of a text",
        "streams: 1",
    ),
}
EXAMPLES = {"train": ("train.py", 5), "generate": ("generate.py", 6), "score": ("-m charlm.score", 4)}


@pytest.mark.parametrize("app", HELP)
def test_help_says_what_the_command_does_and_gives_examples_that_compose(app):
    """``--help``: a description, the settings, then examples (each composes), then Hydra's flags."""
    command, start, listed = HELP[app]
    proc = run_cli(*command, "--help") if command[0] != "-m" else run_module(command[1], "--help")
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    assert text.startswith(start) and listed in text
    assert text.index("Examples:") < text.index("Hydra's flags:") < text.index("--multirun,-m")
    script, count = EXAMPLES[app]
    examples = help_examples(text, script)
    assert len(examples) == count
    for overrides in examples:  # the groups, options and settings they name exist
        compose(overrides[1:] if app == "score" else overrides, config_name=app)  # score's: after the module
    if app == "train":  # every option of every group, but no ``base`` (the node the Python defaults build)
        listed = dict(re.findall(r"^  (\w+): (.*)$", text, flags=re.M))
        groups = [d for d in (ROOT / "conf").iterdir() if d.is_dir() and d.name != "hydra"]
        assert listed == {d.name: ", ".join(sorted(p.stem for p in d.glob("*.yaml"))) for d in groups}
        assert "base" not in text.split("Examples:")[0]


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_smoke_run(experiment, tmp_path: Path):
    run_train(
        tmp_path,
        f"experiment={experiment}",
        "debug=fast",
        "trainer.limit_train_batches=2",
        f"paths.cache_dir={tmp_path}/cache",
    )


def test_a_sweep_goes_on_past_a_job_with_a_bad_config_and_ends_with_its_jobs_best_first(tmp_path):
    """A UserError in one job of a sweep is that job's one-line failure; the next job still trains. The sweep ends
    with a table of its jobs by val/loss (failed ones last), also written as sweep_summary.json."""
    corpus = tmp_path / "tiny.txt"
    corpus.write_text(make_text(), encoding="utf-8")
    overrides = [
        o
        for o in tiny_overrides(corpus, tmp_path, "debug=fast", "test=false", "sample_length=0", "logger=none")
        if not o.startswith(("paths.output_dir", "model.hidden_size"))
    ]
    swept = ["model.dropout=1.5,0.1", "model.hidden_size=8,16"]
    sweep = tmp_path / "sweep"
    proc = run_cli("train.py", "-m", *swept, f"hydra.sweep.dir={sweep}", *overrides, "callbacks=no_logger")
    assert proc.returncode != 0  # Hydra reports the failed jobs when the sweep ends
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    line = "model.dropout=1.5 must be in [0, 1); e.g. model.dropout=0.2."
    # when each fails, and at the end; each names where its job's record went
    shown = [split_record(e) for e in errors]
    assert [e for e, _ in shown] == [f"error: {line}"] * 2 + [f"error: sweep job {i} failed: {line}" for i in (0, 1)]
    assert all(record.parent == sweep / ".failed" for _, record in shown)
    for bad in (*sweep.glob("0_*"), *sweep.glob("1_*")):
        assert not (bad / "checkpoints").exists()

    def val_loss(job: int) -> float:  # what the job's best.ckpt callback saw last
        (good,) = sweep.glob(f"{job}_*")
        ckpt = torch.load(good / "checkpoints/last.ckpt", weights_only=True)
        return float(next(v["current_score"] for k, v in ckpt["callbacks"].items() if k.startswith("ModelCheck")))

    losses = {2: val_loss(2), 3: val_loss(3)}
    order = sorted(losses, key=losses.get)
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert (summary["metric"], summary["direction"]) == ("val/loss", "minimize")
    assert "debug=fast" in summary["shared_overrides"]
    jobs = summary["jobs"]
    assert [j["job"] for j in jobs] == [*order, 0, 1]
    assert [j["status"] for j in jobs] == ["completed", "completed", "failed", "failed"]
    size = {0: 8, 1: 16, 2: 8, 3: 16}
    for j in jobs:
        dropout = "1.5" if j["job"] < 2 else "0.1"
        assert j["overrides"] == [f"model.dropout={dropout}", f"model.hidden_size={size[j['job']]}"]
        assert j["value"] == (pytest.approx(losses[j["job"]]) if j["job"] in losses else None)
        assert (split_record(j["error"])[0] if j["job"] < 2 else j["error"]) == (line if j["job"] < 2 else None)
    printed = proc.stdout[proc.stdout.index("sweep of 4 job(s), lowest val/loss first:") :].splitlines()
    rows = [[str(i), f"{losses[i]:.4f}"] for i in order] + [["0", "failed"], ["1", "failed"]]
    assert [row.split()[:2] for row in printed[2:6]] == rows
    assert printed[6] == f"summary: {sweep / 'sweep_summary.json'}"


def test_optuna_records_a_failed_trial_and_the_search_goes_on(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    optuna = pytest.importorskip("optuna")
    shipped = sorted(p.stem for p in (ROOT / "conf/hparams_search").glob("*.yaml"))
    assert "shakespeare_1min_shapes_optuna" in shipped
    for search in shipped:
        cfg = compose_train([f"hparams_search={search}", f"paths.output_dir={tmp_path}"], return_hydra_config=True)
        assert cfg.hydra.sweeper.max_failure_rate == 1.0
    corpus = tmp_path / "tiny.txt"
    corpus.write_text(make_text(), encoding="utf-8")
    dropout_search(
        tmp_path / "conf",
        "failing",
        f"    direction: minimize\n    study_name: failing\n    storage: sqlite:///{tmp_path}/study.db\n"
        "    n_trials: 4\n    n_jobs: 1\n    max_failure_rate: 1.0\n",
    )
    overrides = [
        o
        for o in tiny_overrides(corpus, tmp_path, "trainer.max_epochs=1", "test=false", "sample_length=0")
        if not o.startswith("paths.output_dir")
    ]
    args = ["--config-dir", str(tmp_path / "conf"), "hparams_search=failing", f"hydra.sweep.dir={tmp_path}/sweep"]
    proc = run_cli("train.py", *args, *overrides)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = optuna.load_study(study_name="failing", storage=f"sqlite:///{tmp_path}/study.db")
    states = {t.params["model.dropout"]: t.state.name for t in study.trials}
    assert len(study.trials) == 4 and states == {0.1: "COMPLETE", 1.5: "FAIL"}
    # the sweep's summary: its trials best first, the failed ones last, and the sweeper's best parameters
    summary = json.loads((tmp_path / "sweep/sweep_summary.json").read_text())
    by_state = [("completed" if t.state.name == "COMPLETE" else "failed", t.value) for t in study.trials]
    ranked = sorted(by_state, key=lambda sv: (sv[0] == "failed", sv[1] or 0.0))
    assert [(j["status"], j["value"]) for j in summary["jobs"]] == [(s, pytest.approx(v)) for s, v in ranked]
    assert summary["optuna"]["best_params"] == {"model.dropout": 0.1}
    assert summary["optuna"]["best_value"] == pytest.approx(study.best_value)
    assert f"optuna's best: model.dropout=0.1 (val/loss {study.best_value:.4f})" in proc.stdout


@pytest.mark.parametrize(
    ("key", "old", "new"),
    [
        ("callbacks.mine", "charlm.callbacks.Throughput", "charlm.training.callbacks.Throughput"),
        ("data", "charlm.data.CharDataModule", "charlm.data.datamodule.CharDataModule"),
        ("logger.tensorboard", "charlm.board.CurvesFirstLogger", "charlm.runs.board.CurvesFirstLogger"),
    ],
)
def test_a_target_naming_a_module_before_the_packages_gets_its_new_name(corpus, tmp_path, key, old, new):
    """A user's own config written for charlm 0.2 (``_target_: charlm.callbacks.X``) is refused before anything is
    written, with the path to write instead."""
    target = f"+{key}._target_={old}" if key == "callbacks.mine" else f"{key}._target_={old}"
    cfg = compose_train(tiny_overrides(corpus, tmp_path / "run", target))
    with pytest.raises(UserError, match=re.escape(f"{key}._target_={old} names a module of charlm before 0.3.0")) as e:
        build(cfg)
    assert str(e.value).endswith(f"write {new}.")
    assert not (Path(cfg.paths.output_dir) / ".hydra").exists()
