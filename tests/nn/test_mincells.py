"""minGRU and minLSTM (charlm/nn/mincells.py): the parallel log-space scan against the paper's sequential equations,
carried state, gradients, bf16 autocast, the O(1) sampling step, a real training run, generation and export."""

from __future__ import annotations

import collections
import json
import math

import pytest
import torch

from charlm.cli import sample, train
from charlm.nn.cells import projections
from charlm.nn.mincells import MinLayer
from charlm.training.module import CharLM
from tests.conftest import (
    assert_onnx_step_equals_stepper,
    assert_stepper_equals_forward,
    compose_generate,
    compose_train,
    make_text,
    rnn,
    run_module,
    tiny_overrides,
)

V = 11
CELLS = ("mingru", "minlstm")


def paper_recurrence(cell: str, gi: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Feng et al. 2024's sequential form, written here from the paper and not from charlm:
    gi [B, T, G*H] (W x_t + b, blocks z|h or f|i|h), h_0 [B, H] -> h [B, T, H]."""

    def g(v):
        return torch.where(v >= 0, v + 0.5, torch.sigmoid(v))

    out = []
    for t in range(gi.shape[1]):
        if cell == "mingru":
            k, v = gi[:, t].chunk(2, -1)
            z = torch.sigmoid(k)
            h = (1 - z) * h + z * g(v)
        else:
            k_f, k_i, v = gi[:, t].chunk(3, -1)
            f, i = torch.sigmoid(k_f), torch.sigmoid(k_i)
            h = f / (f + i) * h + i / (f + i) * g(v)
        out.append(h)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("parallel", [True, False], ids=["scan", "loop"])
@pytest.mark.parametrize("cell", CELLS)
def test_the_layer_equals_the_papers_sequential_recurrence(cell, parallel):
    """150 steps: three scan chunks of 64 (the last one partial); an initial state of both signs."""
    torch.manual_seed(0)
    layer = MinLayer(cell, 5, 8, parallel=parallel).double()
    x = torch.randn(3, 150, 5, dtype=torch.float64) * 2  # gates well away from 1/2, h~ on both branches of g
    h0 = torch.randn(1, 3, 8, dtype=torch.float64)
    with torch.no_grad():
        out, state = layer(x, h0)
        gi = x @ layer.weight_ih_l0.T + layer.bias_ih_l0
        expected = paper_recurrence(cell, gi, h0[0])
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-9)
    torch.testing.assert_close(state, expected[None, :, -1], rtol=0, atol=1e-9)
    assert (gi[..., -8:] < 0).any() and (gi[..., -8:] > 0).any()


@pytest.mark.parametrize("impl", ["fused", "scratch"])
@pytest.mark.parametrize("cell", CELLS)
def test_state_carried_across_two_halves_equals_one_whole_sequence(cell, impl):
    torch.manual_seed(0)
    net = rnn(V, cell=cell, impl=impl, num_layers=3, hidden_size=16, dropout=0.5).double().eval()
    x = torch.randint(0, V, (4, 100))
    for s0 in (None, torch.randn(1, 3, 4, 16, dtype=torch.float64)):  # the zero state, and any state
        whole, s_whole = net(x, s0)
        first, s_half = net(x[:, :37], s0)
        second, s_end = net(x[:, 37:], s_half)
        torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=0, atol=1e-9)
        torch.testing.assert_close(s_end, s_whole, rtol=0, atol=1e-9)


@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("cell", CELLS)
def test_gradcheck_of_the_scan_layer_float64(cell, layer_norm, monkeypatch):
    monkeypatch.setattr("charlm.nn.mincells.SCAN_CHUNK", 2)  # 5 steps cross two chunk boundaries
    torch.manual_seed(0)
    layer = MinLayer(cell, 3, 4, layer_norm=layer_norm).double()
    names = [name for name, _ in layer.named_parameters()]
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    state = torch.randn(1, 2, 4, dtype=torch.float64, requires_grad=True)

    def f(x, state, *params):
        return torch.func.functional_call(layer, dict(zip(names, params, strict=True)), (x, state))

    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    assert torch.autograd.gradcheck(f, (x, state, *params))


@pytest.mark.parametrize("cell", CELLS)
def test_the_scan_runs_in_float32_under_bf16_autocast(cell):
    """Under bf16 autocast the input projection is bf16, the scan must not be: over 128 steps a bf16 scan is off
    by tens of percent, a float32 one by ~1e-6 of the exact recurrence on the same bf16 projections."""
    torch.manual_seed(0)
    layer = MinLayer(cell, 16, 32)
    x, h0 = torch.randn(4, 128, 16), torch.rand(1, 4, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, state = layer(x, h0)
        gi = projections(layer, layer.spec)[0](x)  # [B, T, G*H], as the layer computes it
    assert gi.dtype == torch.bfloat16 and out.dtype == state.dtype == torch.float32
    expected = paper_recurrence(cell, gi.double(), h0[0].double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["fused", "scratch"])
@pytest.mark.parametrize("cell", CELLS)
def test_eval_mode_is_deterministic_and_train_mode_drops(cell, impl):
    torch.manual_seed(0)
    net = rnn(V, cell=cell, impl=impl, num_layers=2, hidden_size=16, dropout=0.5)
    x = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        assert torch.equal(net.eval()(x)[0], net(x)[0])
        assert not torch.equal(net.train()(x)[0], net(x)[0])


@pytest.mark.parametrize("settings", [{}, {"impl": "scratch"}, {"layer_norm": True}])
@pytest.mark.parametrize("cell", CELLS)
def test_stepper_equals_the_forward_pass_at_every_position(cell, settings):
    """One character at a time through ``Stepper`` (the sequential form) = the parallel forward pass."""
    torch.manual_seed(0)
    net = rnn(V, cell=cell, num_layers=2, hidden_size=16, **settings).double().eval()
    if settings.get("layer_norm"):
        with torch.no_grad():  # layer norms start as the identity affine map: make their weights matter
            for name, p in net.named_parameters():
                if ".norm_" in name:
                    p.uniform_(0.5, 1.5)
    x, s0 = torch.randint(0, V, (3, 70)), torch.randn(1, 2, 3, 16, dtype=torch.float64)
    assert_stepper_equals_forward(net, x, s0, atol=1e-9)


@pytest.mark.parametrize("cell", CELLS)
def test_a_tiny_run_learns_context_and_its_checkpoint_generates_text(cell, tmp_path):
    """The real ``charlm-train`` path (model=<cell>, TBPTT with carried state, checkpoint) then ``charlm-generate``.

    Below the corpus's unigram entropy by 0.5 nats means the model uses the characters before each one."""
    text = make_text()
    corpus = tmp_path / "tiny.txt"
    corpus.write_text(text, encoding="utf-8")
    counts = collections.Counter(text).values()
    unigram = -sum(n / len(text) * math.log(n / len(text)) for n in counts)  # 2.57 nats
    extra = (f"model={cell}", "model.dropout=0", "optim.lr=0.02", "logger=none", "test=false", "sample_length=0")
    metrics = train(compose_train(tiny_overrides(corpus, tmp_path / "run", *extra)))
    assert metrics["val/loss"] < unigram - 0.5, metrics
    ckpt = tmp_path / "run/checkpoints/best.ckpt"
    (generated,) = sample(compose_generate([f"ckpt={ckpt}", "prompt='abc '", "length=60", "temperature=0"]))
    assert generated.startswith("abc ") and len(generated) == 64
    assert set(generated) <= set(text) and len(set(generated[4:])) > 2  # words, not one repeated character


@pytest.mark.parametrize("settings", [{"cell": "mingru"}, {"cell": "minlstm", "layer_norm": True, "num_layers": 3}])
def test_the_min_cells_export_to_onnx(tmp_path, settings):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from charlm.export import export_onnx

    torch.manual_seed(0)
    model = CharLM({"chars": "abcdefg \n", "unk": None}, hidden_size=16, **settings)
    onnx_path, _ = export_onnx(model, tmp_path / "m.onnx")
    ids, state = torch.tensor([0, 3, 8]), torch.randn(model.net.init_state(3).shape)  # [1, L, 3, H]
    assert_onnx_step_equals_stepper(onnx_path, model, ids, state)


def test_the_cells_benchmark_matches_the_min_cells_to_the_lstms_parameter_count(tmp_path):
    out = tmp_path / "cells.json"
    proc = run_module("bench.cells", "--quick", "--cells", "lstm", "--match-lstm", "32", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "equal parameter count" in proc.stdout
    rows = {r["cell"]: r for r in json.loads(out.read_text())["equal_params"]}
    assert list(rows) == ["lstm", *CELLS] and rows["lstm"]["hidden"] == 32
    for cell in CELLS:  # a min layer has 2 or 3 blocks of H rows to the LSTM's 8, so a wider H matches
        assert rows[cell]["hidden"] > 32
        assert rows[cell]["params"] == pytest.approx(rows["lstm"]["params"], rel=0.03)
        assert rows[cell]["vs_lstm"] == pytest.approx(rows[cell]["chars_per_s"] / rows["lstm"]["chars_per_s"])
