"""Regularisers beyond Zaremba: locked (variational) dropout, recurrent dropout, weight-drop, layer norm."""

import pytest
import torch

from charlm import UserError
from charlm.nn.rnn import CELLS, RNNStack
from tests.conftest import rnn

V = 13
OPTIONS = {
    "locked_dropout": {"locked_dropout": True, "dropout": 0.5},
    "recurrent_dropout": {"recurrent_dropout": 0.5, "impl": "scratch"},
    "weight_drop (fused)": {"weight_drop": 0.5},
    "weight_drop (scratch)": {"weight_drop": 0.5, "impl": "scratch"},
}


def build(seed: int = 0, **kw) -> RNNStack:
    torch.manual_seed(seed)
    kw = {"cell": "lstm", "num_layers": 2, "hidden_size": 16, "dropout": 0.0} | kw
    return rnn(V, **kw)


@pytest.mark.parametrize("option", OPTIONS)
def test_option_acts_in_train_mode_and_changes_nothing_in_eval(option):
    kw = OPTIONS[option]
    plain = build(impl=kw.get("impl", "fused"))
    regular = build(**kw)
    regular.load_state_dict(plain.state_dict())
    x = torch.randint(0, V, (4, 12))
    plain.eval(), regular.eval()
    with torch.no_grad():
        a, sa = plain(x)
        b, sb = regular(x)
    assert torch.equal(a, b) and torch.equal(sa, sb)
    regular.train()
    with torch.no_grad():
        c, _ = regular(x)
    assert not torch.allclose(a, c)  # in training the option really does something


def test_layer_norm_is_the_same_in_train_and_eval_and_differs_from_the_plain_cell():
    for cell in CELLS:
        net = build(cell=cell, impl="scratch", layer_norm=True)
        x = torch.randint(0, V, (3, 10))
        with torch.no_grad():
            train_out, _ = net.train()(x)
            eval_out, _ = net.eval()(x)
            plain = build(cell=cell, impl="scratch")
            plain.load_state_dict(net.state_dict(), strict=False)  # same weights, no norms
            plain_out, _ = plain.eval()(x)
        assert torch.equal(train_out, eval_out)
        assert not torch.allclose(eval_out, plain_out)


def test_locked_dropout_mask_is_constant_across_time():
    """The decoder input of each stream must lose the same units at every step, and streams differ."""
    net = build(locked_dropout=True, dropout=0.5).train()
    seen = []
    net.decoder.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    net(torch.randint(0, V, (4, 30)))
    zero = seen[0] == 0  # [B, T, H]
    assert zero.any()
    assert torch.equal(zero, zero[:, :1].expand_as(zero))  # same pattern at every t
    assert not torch.equal(zero[0], zero[1])  # one mask per sequence, not one for the batch
    standard = build(dropout=0.5).train()
    seen.clear()
    standard.decoder.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    standard(torch.randint(0, V, (4, 30)))
    assert not torch.equal(seen[0] == 0, (seen[0] == 0)[:, :1].expand_as(seen[0]))  # the test can tell


def identity_relu_layer(**kw) -> RNNStack:
    """One rnn_relu layer with W_hh = I and no input: h_t = relu(h_(t-1)) = h_(t-1), unless something is dropped.

    A mask m fixed for the whole sequence gives h_t = m^t * h_0: the same units are zero at every step and the
    survivors grow as (1 / (1 - p))^t. A fresh mask per step would zero more units as t grows."""
    net = build(cell="rnn_relu", num_layers=1, hidden_size=64, **kw).train()
    with torch.no_grad():
        for name, p in net.layers[0].named_parameters():
            p.copy_(torch.eye(64) if name == "weight_hh_l0" else torch.zeros_like(p))
    return net


@pytest.mark.parametrize(
    "kw", [{"recurrent_dropout": 0.5, "impl": "scratch"}, {"weight_drop": 0.5}, {"weight_drop": 0.5, "impl": "scratch"}]
)
def test_recurrent_masks_are_constant_across_time(kw):
    net = identity_relu_layer(**kw)
    p = kw.get("recurrent_dropout", kw.get("weight_drop"))
    seen = []
    net.decoder.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))  # the layer's h_1 .. h_T
    net(torch.zeros(3, 20, dtype=torch.long), torch.ones(1, 1, 3, 64))
    out = seen[0]  # [B, T, H]
    alive = out[:, 0] != 0  # [B, H] after the first step
    assert 0 < alive.sum() < alive.numel()
    for t in range(20):
        assert torch.equal(out[:, t] != 0, alive), f"a different mask at step {t}"
        torch.testing.assert_close(out[:, t][alive], torch.full_like(out[:, t][alive], (1 / (1 - p)) ** (t + 1)))


def test_weight_drop_on_fused_layers_trains_the_raw_weights():
    net = build(weight_drop=0.5).train()
    logits, _ = net(torch.randint(0, V, (4, 12)))
    logits.sum().backward()
    grad = net.layers[0].weight_hh_l0.grad
    assert grad is not None and (grad == 0).any() and (grad != 0).any()  # dropped connections get no gradient


@pytest.mark.parametrize(
    "kw, word",
    [
        ({"recurrent_dropout": 0.2}, "impl=scratch"),
        ({"layer_norm": True}, "impl=scratch"),
        ({"impl": "cudnn"}, "model.impl"),
        ({"weight_drop": 1.0}, "weight_drop"),
        ({"recurrent_dropout": -0.1, "impl": "scratch"}, "recurrent_dropout"),
    ],
)
def test_bad_regulariser_settings_name_the_fix(kw, word):
    with pytest.raises(UserError, match=word.replace(".", r"\.")):
        build(**kw)
