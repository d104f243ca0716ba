"""``charlm-export``: the ONNX step model, run by onnxruntime as a user would, writes what ``generate.py`` writes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from charlm import UserError
from charlm.cli import sample, train
from charlm.config import compose
from charlm.export import export, export_onnx
from charlm.training.module import CharLM, load_checkpoint
from tests.conftest import (
    assert_onnx_step_equals_stepper,
    assert_user_error,
    compose_generate,
    compose_train,
    make_text,
    run_module,
    tiny_overrides,
)

# The export extra; without it (a default install) there is nothing to test.
pytest.importorskip("onnx")
pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

CELLS = ("lstm", "gru")


def run_exports(*arg_lists: list[str]) -> list[subprocess.CompletedProcess]:
    """``python -m charlm.export ARGS`` for each list of arguments, side by side: each spends ~4 s on imports."""
    with ThreadPoolExecutor(len(arg_lists)) as pool:
        return list(pool.map(lambda args: run_module("charlm.export", *args), arg_lists))


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory) -> dict[str, Path]:
    """cell -> a tiny trained checkpoint (lstm: a copy of the shared tiny run's), exported by the CLI to
    <stem>.onnx and <stem>.vocab.json beside it."""
    tmp = tmp_path_factory.mktemp("export")
    ckpts = {"lstm": tmp / "lstm.ckpt"}
    shutil.copyfile(tiny_run.out / "checkpoints/best.ckpt", ckpts["lstm"])
    for cell in set(CELLS) - set(ckpts):
        out = tmp / cell
        extra = (f"model={cell}", "trainer.max_epochs=1", "logger=none", "test=false", "sample_length=0")
        train(compose_train(tiny_overrides(tiny_run.corpus, out, *extra)))
        ckpts[cell] = out / "checkpoints/best.ckpt"
    for proc in run_exports(*([f"ckpt={ckpt}"] for ckpt in ckpts.values())):
        assert proc.returncode == 0, proc.stderr[-2000:]
    return ckpts


def greedy(onnx_path: Path, vocab_path: Path, prompt: str, length: int) -> str:
    """The README's loop: the prompt one character (byte) at a time from the zero state, then ``length`` argmax
    steps."""
    sess = ort.InferenceSession(onnx_path)
    vocab = json.loads(Path(vocab_path).read_text("utf-8"))
    chars, state = vocab["chars"], np.zeros(vocab["state_shape"], np.float32)  # [S, L, 1, H]
    byte = vocab["unit"] == "byte"  # data.unit=byte: chars[i] is chr(i), and the text is stepped through as UTF-8 bytes
    text = prompt.encode().decode("latin-1") if byte else prompt
    for c in text[:-1]:  # the prompt but its last character, one at a time from the zero state
        _, state = sess.run(None, {"ids": np.array([chars.index(c)], np.int64), "state": state})
    for _ in range(length):  # greedy; for variety, draw from softmax(logits / temperature) instead
        logits, state = sess.run(None, {"ids": np.array([chars.index(text[-1])], np.int64), "state": state})
        text += chars[logits[0].argmax()]
    return text.encode("latin-1").decode("utf-8", "replace") if byte else text


@pytest.mark.parametrize("cell", CELLS)
def test_onnx_greedy_text_equals_generate(exported, cell):
    ckpt = exported[cell]
    assert ckpt.with_suffix(".onnx").is_file() and ckpt.with_suffix(".vocab.json").is_file()
    text = greedy(ckpt.with_suffix(".onnx"), ckpt.with_suffix(".vocab.json"), "abc ", 200)
    expected = sample(compose_generate([f"ckpt={ckpt}", "prompt='abc '", "length=200", "temperature=0"]))[0]
    assert len(text) == 204 and len(set(text[4:])) > 2  # a real sample, not one repeated character
    assert text == expected


def test_the_readme_loop_runs_a_byte_model_as_generate_does(tmp_path):
    """A data.unit=byte export wrote "chars": null, so the README's loop failed on byte models."""
    corpus = tmp_path / "tiny.txt"
    corpus.write_text(make_text(), encoding="utf-8")
    out = tmp_path / "bytes"
    extra = ("data.unit=byte", "trainer.max_epochs=1", "trainer.precision=32-true", "logger=none", "test=false")
    train(compose_train(tiny_overrides(corpus, out, *extra, "sample_length=0")))
    ckpt = out / "checkpoints/best.ckpt"
    (proc,) = run_exports([f"ckpt={ckpt}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    prompt = "abc \u00e9 "  # é: two bytes, stepped through one at a time
    text = greedy(ckpt.with_suffix(".onnx"), ckpt.with_suffix(".vocab.json"), prompt, 200)
    expected = sample(compose_generate([f"ckpt={ckpt}", f"prompt='{prompt}'", "length=200", "temperature=0"]))[0]
    assert len(text.encode()) == len(prompt.encode()) + 200 and len(set(text[len(prompt) :])) > 2
    assert text == expected


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("batch", [1, 3])
def test_one_step_matches_stepper_at_any_batch_size(exported, cell, batch):
    ckpt = exported[cell]
    model = load_checkpoint(ckpt)
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(len(model.vocab), (batch,), generator=gen)
    state = torch.randn(model.net.init_state(batch).shape, generator=gen)  # [S, L, N, H]: every slot matters
    assert_onnx_step_equals_stepper(ckpt.with_suffix(".onnx"), model, ids, state)


@pytest.mark.parametrize(
    "settings",
    [
        {"cell": "lstm", "impl": "scratch", "layer_norm": True, "num_layers": 3},
        {"cell": "rnn_relu", "embedding_size": 0, "num_layers": 1, "tie_weights": False},
    ],
    ids=["lstm-scratch-layernorm", "rnn_relu-onehot"],
)
def test_every_cell_and_impl_exports(tmp_path, settings):
    torch.manual_seed(0)
    model = CharLM({"chars": "abcdefg \n", "unk": None}, hidden_size=16, **settings)
    with torch.no_grad():  # layer norms start as the identity affine map: make their weights matter
        for name, p in model.named_parameters():
            if ".norm_" in name:
                p.uniform_(0.5, 1.5)
    onnx_path, vocab_path = export_onnx(model, tmp_path / "m.onnx")
    assert vocab_path == tmp_path / "m.vocab.json"
    state = torch.randn(model.net.init_state(3).shape)  # [S, L, 3, H]
    meta = json.loads(vocab_path.read_text(encoding="utf-8"))
    assert meta["state_shape"] == [*state.shape[:2], 1, 16] and meta["chars"] == "\n abcdefg"
    ids = torch.tensor([0, 3, 8])
    assert_onnx_step_equals_stepper(onnx_path, model, ids, state)


def test_export_cli_rejects_bad_settings_and_keeps_the_checkpoint(exported, tmp_path):
    ckpt = exported["lstm"]
    before = ckpt.read_bytes()
    missing, unknown, onto_ckpt = run_exports([], [f"ckpt={ckpt}", "format=tflite"], [f"ckpt={ckpt}", f"out={ckpt}"])
    assert_user_error(missing, "pass ckpt=")
    assert_user_error(unknown, "use one of: onnx")
    assert_user_error(onto_ckpt, "would overwrite the checkpoint")
    assert ckpt.read_bytes() == before


def test_export_refuses_a_directory_and_names_the_extra_when_it_is_missing(exported, tmp_path, monkeypatch):
    ckpt = exported["gru"]
    with pytest.raises(UserError, match="is a directory"):
        export(compose([f"ckpt={ckpt}", f"out={tmp_path}"], config_name="export"))
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # as in a default install, without the export extra
    with pytest.raises(UserError, match=r'needs onnxscript, .*pip install "charlm-lightning\[export\]"'):
        export(compose([f"ckpt={ckpt}", f"out={tmp_path / 'm.onnx'}"], config_name="export"))
    assert not list(tmp_path.iterdir())
