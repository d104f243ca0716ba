"""The cell equations of charlm/nn/cells.py against torch's fused kernels, autograd, and the seed articles' math."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from charlm.nn.cells import CELLS, ScratchLayer, cells_with, gru_step, register_cell
from charlm.nn.rnn import RNNStack
from tests.conftest import rnn

V = 11


def twin_nets(cell: str, num_layers: int, dtype: torch.dtype, **kw) -> tuple[RNNStack, RNNStack]:
    """A fused and a scratch net holding the same weights: the scratch one loads the fused state dict as is."""
    torch.manual_seed(0)
    kw = {
        "cell": cell,
        "num_layers": num_layers,
        "hidden_size": 8,
        "embedding_size": 5,
        "dropout": 0.0,
        "tie_weights": False,
    } | kw
    fused = rnn(V, impl="fused", **kw).to(dtype)
    scratch = rnn(V, impl="scratch", **kw).to(dtype)
    assert fused.state_dict().keys() == scratch.state_dict().keys()  # same names, same layout: no conversion
    scratch.load_state_dict(fused.state_dict())
    return fused, scratch


def run_and_backward(net: RNNStack, x: torch.Tensor, state: torch.Tensor | None):
    logits, new_state = net(x, state)
    probe = torch.Generator().manual_seed(1)  # random weights on every output, so no gradient term can cancel
    loss = (logits * torch.randn(logits.shape, generator=probe, dtype=logits.dtype)).sum()
    loss = loss + (new_state * torch.randn(new_state.shape, generator=probe, dtype=logits.dtype)).sum()
    loss.backward()
    grads = {name: p.grad for name, p in net.named_parameters()}
    return logits, new_state, grads, None if state is None else state.grad


def assert_twins_agree(fused: RNNStack, scratch: RNNStack, with_state: bool, tol: float) -> None:
    """Outputs, final states, every parameter's gradient and the initial state's gradient are equal."""
    dtype = next(fused.parameters()).dtype
    x = torch.randint(0, V, (3, 9))
    init = torch.randn(fused.init_state(3).shape, dtype=dtype) if with_state else None
    results = []
    for net in (fused, scratch):
        state = None if init is None else init.clone().requires_grad_()
        results.append(run_and_backward(net, x, state))
    (lf, sf, gf, dsf), (ls, ss, gs, dss) = results
    torch.testing.assert_close(ls, lf, atol=tol, rtol=tol)
    torch.testing.assert_close(ss, sf, atol=tol, rtol=tol)
    assert gf.keys() == gs.keys()
    for name in gf:
        torch.testing.assert_close(gs[name], gf[name], atol=tol, rtol=tol, msg=f"gradient of {name}")
    if with_state:
        torch.testing.assert_close(dss, dsf, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("num_layers", [1, 3])
@pytest.mark.parametrize("cell", CELLS)
def test_scratch_equals_fused(cell, num_layers, with_state, dtype, tol):
    """For the min cells: the parallel scan (fused) against the time loop (scratch)."""
    assert_twins_agree(*twin_nets(cell, num_layers, dtype), with_state, tol)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-6), (torch.float32, 1e-4)])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("num_layers", [1, 3])
def test_lstmp_scratch_equals_fused(num_layers, with_state, dtype, tol):
    """LSTM with a projection: torch's nn.LSTM(proj_size=3) against h = W_hr (o * tanh C) in charlm/nn/cells.py."""
    fused, scratch = twin_nets("lstm", num_layers, dtype, proj_size=3)
    assert fused.layers[0].proj_size == 3 and scratch.layers[0].weight_hr_l0.shape == (3, 8)
    assert_twins_agree(fused, scratch, with_state, tol)


def test_lstmp_with_weight_drop_drops_the_same_w_hh_in_both_implementations():
    """Weight-drop masks W_hh [4H, P]; under one seed both implementations draw the same mask."""
    fused, scratch = twin_nets("lstm", 2, torch.float64, proj_size=3, weight_drop=0.5)
    x = torch.randint(0, V, (3, 9))
    outs = []
    for net in (fused, scratch):
        torch.manual_seed(7)
        outs.append(net.train()(x)[0])
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-9)
    assert not torch.allclose(outs[0], fused.eval()(x)[0])  # the mask did act


@pytest.mark.parametrize("layer_norm", [False, True])
# The cells ScratchLayer runs (those with W_hh), and the LSTMP; the min cells: tests/nn/test_mincells.py.
@pytest.mark.parametrize("cell, proj_size", [(cell, 0) for cell in cells_with(lambda s: s.recurrent)] + [("lstm", 2)])
def test_gradcheck_float64(cell, proj_size, layer_norm):
    torch.manual_seed(0)
    layer = ScratchLayer(cell, 3, 4, layer_norm=layer_norm, proj_size=proj_size).double()
    names = [name for name, _ in layer.named_parameters()]
    slots = CELLS[cell].slots
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    state = torch.randn(slots, 2, 4, dtype=torch.float64, requires_grad=True)

    def f(x, state, *params):
        out, new_state = torch.func.functional_call(layer, dict(zip(names, params, strict=True)), (x, state))
        return out, new_state

    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    assert torch.autograd.gradcheck(f, (x, state, *params))


def test_hand_derived_bptt_of_the_many_to_one_rnn_equals_autograd():
    """Seed 000, "RNN from theory to PyTorch": sequences like [10, 20, 30] -> 40, input size 1, hidden size 2,
    tanh, and a linear head on the three hidden states concatenated. The backward pass below is the article's
    chain rule written out in NumPy; it must equal autograd through the scratch cell."""
    seqs = np.array([[10, 20, 30], [20, 30, 40], [30, 40, 50], [40, 50, 60]], dtype=np.float64) / 100  # normalised
    target = np.array([40, 50, 60, 70], dtype=np.float64) / 100
    rng = np.random.default_rng(0)
    W_x, W_h, b = rng.normal(size=(2, 1)), rng.normal(size=(2, 2)), rng.normal(size=2)
    W_lin, b_lin = rng.normal(size=(1, 6)), rng.normal(size=1)
    n, T = seqs.shape

    # forward: h_t = tanh(W_x x_t + W_h h_(t-1) + b); y^ = W_lin [h_1, h_2, h_3] + b_lin; L = mean (y^ - y)^2
    hs = [np.zeros((n, 2))]
    for t in range(T):
        hs.append(np.tanh(seqs[:, t : t + 1] @ W_x.T + hs[-1] @ W_h.T + b))
    H = np.concatenate(hs[1:], axis=1)  # [n, 6]
    y_hat = H @ W_lin.T + b_lin  # [n, 1]
    loss = np.mean((y_hat[:, 0] - target) ** 2)

    # backward, by the chain rule
    dy = 2 * (y_hat[:, 0] - target)[:, None] / n  # dL/dy^ [n, 1]
    dW_lin, db_lin = dy.T @ H, dy.sum(0)
    dH = (dy @ W_lin).reshape(n, T, 2)  # dL/dh_t from the head, back to the shape of the hidden states
    dW_x, dW_h, db = np.zeros_like(W_x), np.zeros_like(W_h), np.zeros_like(b)
    carry = np.zeros((n, 2))  # dL/dh_t arriving from step t + 1 through W_h
    for t in reversed(range(T)):
        delta = (dH[:, t] + carry) * (1 - hs[t + 1] ** 2)  # through tanh: d tanh(a) / da = 1 - tanh(a)^2
        dW_x += delta.T @ seqs[:, t : t + 1]
        dW_h += delta.T @ hs[t]
        db += delta.sum(0)
        carry = delta @ W_h

    layer = ScratchLayer("rnn_tanh", 1, 2).double()
    head = nn.Linear(6, 1).double()
    with torch.no_grad():
        layer.weight_ih_l0.copy_(torch.from_numpy(W_x))
        layer.weight_hh_l0.copy_(torch.from_numpy(W_h))
        layer.bias_ih_l0.copy_(torch.from_numpy(b))
        layer.bias_hh_l0.zero_()
        head.weight.copy_(torch.from_numpy(W_lin))
        head.bias.copy_(torch.from_numpy(b_lin))
    out, _ = layer(torch.from_numpy(seqs)[:, :, None], torch.zeros(1, n, 2, dtype=torch.float64))
    y = head(out.reshape(n, 6))[:, 0]
    torch_loss = ((y - torch.from_numpy(target)) ** 2).mean()
    torch_loss.backward()

    assert torch_loss.item() == pytest.approx(loss, rel=1e-12)
    for mine, theirs in [
        (dW_x, layer.weight_ih_l0.grad),
        (dW_h, layer.weight_hh_l0.grad),
        (db, layer.bias_ih_l0.grad),
        (db, layer.bias_hh_l0.grad),  # b = b_ih + b_hh, so both receive dL/db
        (dW_lin, head.weight.grad),
        (db_lin, head.bias.grad),
    ]:
        np.testing.assert_allclose(theirs.numpy(), mine, rtol=1e-10, atol=1e-12)
    assert np.abs(dW_h).max() > 1e-3  # the recurrent path carried real gradient


class NumpyRNNLayer:
    """Seed 003's NumPy RNN layer: loop over the sequence, output_t = f(W x_t + U state_t + b), state <- output_t.

    The article uses a sigmoid; torch's RNN cells (and ours) offer tanh and relu, so ``f`` is a parameter."""

    def __init__(self, input_feature: int, output_feature: int, f, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.W = rng.uniform(-0.5, 0.5, size=(output_feature, input_feature))
        self.U = rng.uniform(-0.5, 0.5, size=(output_feature, output_feature))
        self.b = rng.uniform(-0.5, 0.5, size=(output_feature,))
        self.f, self.state_t = f, np.zeros((output_feature,))

    def forward_propagation(self, inputs: np.ndarray) -> np.ndarray:
        output = []
        for input_t in inputs:
            output_t = self.f(np.dot(self.W, input_t) + np.dot(self.U, self.state_t) + self.b)
            output.append(output_t)
            self.state_t = output_t
        return np.stack(output)


@pytest.mark.parametrize("cell, f", [("rnn_tanh", np.tanh), ("rnn_relu", lambda a: np.maximum(a, 0))])
def test_numpy_reference_forward_equals_the_scratch_cell(cell, f):
    ref = NumpyRNNLayer(5, 10, f)  # the article's sizes: 20 words of 5 features -> 10 units
    inputs = np.random.default_rng(1).uniform(size=(20, 5))
    expected = ref.forward_propagation(inputs)
    layer = ScratchLayer(cell, 5, 10).double()
    with torch.no_grad():
        layer.weight_ih_l0.copy_(torch.from_numpy(ref.W))
        layer.weight_hh_l0.copy_(torch.from_numpy(ref.U))
        layer.bias_ih_l0.copy_(torch.from_numpy(ref.b))
        layer.bias_hh_l0.zero_()
        out, state = layer(torch.from_numpy(inputs)[None], torch.zeros(1, 1, 10, dtype=torch.float64))
    np.testing.assert_allclose(out[0].numpy(), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(state[0, 0].numpy(), ref.state_t, rtol=1e-12, atol=1e-12)
    assert (expected > 0.1).any()  # a live layer, not all zeros


# ---- the registry ----


def test_a_cell_name_is_registered_once():
    with pytest.raises(ValueError, match="'gru' is registered already"):
        register_cell(replace(CELLS["gru"]))
    assert CELLS["gru"].step is gru_step


@pytest.mark.parametrize(
    "bad, why",
    [
        ({"parallel": lambda gi, h0: gi}, "a parallel form needs gates that read x_t alone"),
        ({"slots": 1, "norm_c": False}, "norm_c and projects act on a memory C besides h"),
        ({"order": (0, 1, 2, 2)}, "order must list each of the 4 blocks once"),
        ({"recurrent": False, "parallel": None}, "summed adds W_hh h to W_ih x"),
    ],
)
def test_a_spec_that_contradicts_itself_is_refused(bad, why):
    """Each derived from the LSTM's spec by one or two fields."""
    with pytest.raises(ValueError, match=why):
        replace(CELLS["lstm"], **bad)
