"""A cell added from outside charlm: a coupled-input-forget-gate LSTM, registered by this file alone, trains
through ``charlm-train``, resumes exactly from a mid-run checkpoint, samples through the Stepper and
``charlm-generate``, and exports to ONNX, with no change to any file of charlm. The fixture unregisters it."""

from __future__ import annotations

import json
import math

import pytest
import torch

from charlm import UserError
from charlm.cli import sample, train
from charlm.nn.cells import CELLS, CellSpec, register_cell
from charlm.nn.rnn import RNNConfig
from charlm.nn.stepper import Stepper
from charlm.training.module import CharLM
from tests.conftest import (
    assert_onnx_step_equals_stepper,
    assert_stepper_equals_forward,
    compose_generate,
    compose_train,
    rnn,
    tiny_overrides,
)


def cifg_step(gi: torch.Tensor, gh: torch.Tensor | None, state, norm_c=None):
    """CIFG LSTM (Greff et al. 2017, "LSTM: A Search Space Odyssey"): the forget gate is 1 - i. Blocks i|g|o:
    i_t = sigmoid(.), C~_t = tanh(.), o_t = sigmoid(.); C_t = (1 - i_t) * C_(t-1) + i_t * C~_t; h_t = o_t * tanh(C_t).
    """
    c = state[1]
    i, g, o = (gi if gh is None else gi + gh).chunk(3, -1)
    i = torch.sigmoid(i)
    c = c + i * (torch.tanh(g) - c)  # = (1 - i) * C + i * C~
    return torch.sigmoid(o) * torch.tanh(c if norm_c is None else norm_c(c)), c


CIFG = CellSpec(name="cifg", blocks=3, step=cifg_step, slots=2, summed=True, norm_c=True)


@pytest.fixture
def cifg():
    register_cell(CIFG)
    yield CIFG.name
    del CELLS[CIFG.name]  # registered for this test only


def test_the_spec_shapes_the_layers_and_the_state(cifg):
    net = rnn(11, cell=cifg, impl="scratch", num_layers=2, hidden_size=8)
    assert [tuple(p.shape) for p in net.layers[0].parameters()] == [(24, 8), (24, 8), (24,), (24,)]  # 3H rows
    assert net.init_state(5).shape == (2, 2, 5, 8)  # h and C
    with pytest.raises(UserError, match=r"^model.cell=cifg has no fused implementation; use model.impl=scratch.$"):
        RNNConfig(cell=cifg)  # no torch kernel, no parallel form: the default impl names the one it has


@pytest.mark.parametrize("layer_norm", [False, True], ids=["summed", "layer_norm"])
def test_the_stepper_equals_the_forward_pass_at_every_position(cifg, layer_norm):
    """Without layer norm the Stepper adds both projections in one product (``CellSpec.summed``); with it, not."""
    torch.manual_seed(0)
    net = rnn(11, cell=cifg, impl="scratch", num_layers=2, hidden_size=8, layer_norm=layer_norm).double().eval()
    x, s0 = torch.randint(0, 11, (3, 20)), torch.randn(net.init_state(3).shape, dtype=torch.float64)
    assert Stepper(net).summed != layer_norm
    assert_stepper_equals_forward(net, x, s0, atol=1e-12)


def test_it_trains_resumes_exactly_and_generates(cifg, corpus, tmp_path):
    """30 steps of ``charlm-train``, and the same run stopped at step 13 and resumed from its last.ckpt: the same
    weights and val loss at the end. Then ``charlm-generate`` from the checkpoint, through the Stepper."""

    def run(out, *extra):
        settings = ("model.cell=cifg", "model.impl=scratch", "optim.lr=0.05", "optim.scheduler=none")
        short = ("trainer.max_epochs=1", "trainer.limit_train_batches=30", "trainer.limit_val_batches=2")
        quiet = ("trainer.precision=32-true", "logger=none", "callbacks=no_logger", "test=false", "sample_length=0")
        return train(compose_train(tiny_overrides(corpus, tmp_path / out, *settings, *short, *quiet, *extra)))

    straight = run("straight")
    vocab_size = len(set(corpus.read_text(encoding="utf-8")))
    assert straight["val/loss"] < math.log(vocab_size) - 0.2, straight  # uniform: ln V; unigram: ln V - 0.07
    run("stopped", "trainer.max_steps=13")
    stopped = torch.load(tmp_path / "stopped/checkpoints/last.ckpt", weights_only=True)
    assert stopped["global_step"] == 13 and stopped["hyper_parameters"]["cell"] == "cifg"
    resumed = run("resumed", f"ckpt_path={tmp_path}/stopped/checkpoints/last.ckpt")
    assert resumed["val/loss"] == pytest.approx(straight["val/loss"], abs=1e-6)
    ends = [torch.load(tmp_path / f"{r}/checkpoints/last.ckpt", weights_only=True) for r in ("straight", "resumed")]
    assert ends[0]["global_step"] == ends[1]["global_step"] == 30
    for name, weight in ends[0]["state_dict"].items():
        assert torch.equal(weight, ends[1]["state_dict"][name]), name

    ckpt = tmp_path / "straight/checkpoints/last.ckpt"
    (text,) = sample(compose_generate([f"ckpt={ckpt}", "prompt='abc '", "length=40", "temperature=0"]))
    assert text.startswith("abc ") and len(text) == 44 and len(set(text[4:])) > 2


def test_it_exports_to_onnx(cifg, tmp_path):
    """The ONNX step model of a two-layer CIFG with layer norm runs as the Stepper does."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from charlm.export import export_onnx

    torch.manual_seed(0)
    model = CharLM({"chars": "abcdefg \n", "unk": None}, cell=cifg, impl="scratch", hidden_size=16, layer_norm=True)
    onnx_path, vocab_path = export_onnx(model, tmp_path / "cifg.onnx")
    assert json.loads(vocab_path.read_text())["state_shape"] == [2, 2, 1, 16]  # h and C, 2 layers
    ids, state = torch.tensor([0, 3, 8]), torch.randn(model.net.init_state(3).shape)  # [2, L, 3, H]
    assert_onnx_step_equals_stepper(onnx_path, model, ids, state)


def test_model_cell_refuses_the_cell_once_the_fixture_has_unregistered_it():
    """Last in this file: the tests above registered it, and it must not leak into the rest of the run."""
    with pytest.raises(UserError, match=r"model.cell='cifg' is not known; use one of lstm, gru"):
        RNNConfig(cell="cifg", impl="scratch")
