import math
import re

import pytest
import torch
import torch.nn.functional as F

import charlm.hardware
import charlm.nn.rnn
from charlm import UserError
from charlm.data.vocab import CharVocab
from charlm.nn.cells import CELLS
from charlm.nn.rnn import RNNConfig, RNNStack
from charlm.training.module import CharLM
from tests.conftest import assert_onnx_step_equals_stepper, assert_stepper_equals_forward, rnn

V = 40


def rand_state(net: RNNStack, batch: int) -> torch.Tensor:
    return torch.randn(net.state_slots, net.num_layers, batch, net.hidden_size)


@pytest.mark.parametrize("cell", CELLS)
def test_loss_at_initialisation_is_ln_vocab(cell):
    torch.manual_seed(0)
    # untied: a tied decoder shares nn.Embedding's N(0, 1) init and starts higher; starting the shared matrix at
    # the decoder's scale instead trained far worse (README, The Time Machine)
    net = rnn(V, cell=cell, num_layers=2, hidden_size=64, dropout=0.0, tie_weights=False)
    x = torch.randint(0, V, (8, 50))
    logits, _ = net(x)
    loss = F.cross_entropy(logits.reshape(-1, V), torch.randint(0, V, (8 * 50,)))
    assert abs(loss.item() - math.log(V)) < 0.1


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_tiny_text_overfits_to_near_zero_loss(cell):
    torch.manual_seed(0)
    text = "the quick brown fox jumps over the lazy dog; " * 3
    vocab = CharVocab.from_text(text)
    ids = torch.from_numpy(vocab.encode(text).astype("int64"))[None]  # [1, N]
    net = rnn(len(vocab), cell=cell, num_layers=2, hidden_size=64, dropout=0.0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(150):
        logits, _ = net(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, len(vocab)), ids[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


@pytest.mark.parametrize("cell", CELLS)
def test_future_characters_never_change_past_logits(cell):
    torch.manual_seed(0)
    net = rnn(V, cell=cell, num_layers=2, hidden_size=32).eval()
    x = torch.randint(0, V, (3, 20))
    for t in (0, 7, 18):
        x2 = x.clone()
        x2[:, t + 1] = (x2[:, t + 1] + 1) % V
        a, b = net(x)[0], net(x2)[0]
        assert torch.equal(a[:, : t + 1], b[:, : t + 1])
        assert not torch.allclose(a[:, t + 1], b[:, t + 1])  # the changed input does matter


@pytest.mark.parametrize("cell", CELLS)
def test_carried_state_makes_two_halves_equal_the_whole(cell):
    torch.manual_seed(0)
    net = rnn(V, cell=cell, num_layers=3, hidden_size=32, tie_weights=False).eval()  # logits of the scale atol is for
    x, s0 = torch.randint(0, V, (4, 30)), rand_state(net, 4)
    whole, s_whole = net(x, s0)
    first, s_half = net(x[:, :13], s0)
    second, s_end = net(x[:, 13:], s_half)
    # The min cells' log-space scan rounds to ~1e-6 relative in float32 (charlm.nn.mincells.parallel_scan); the
    # float64 version of this test for them, at 1e-9: tests/nn/test_mincells.py.
    atol = 1e-5 if CELLS[cell].parallel is not None else 1e-6
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=0, atol=atol)
    torch.testing.assert_close(s_end, s_whole, rtol=0, atol=atol)


def test_lightning_module_carries_state_between_batches_until_reset():
    torch.manual_seed(0)
    model = CharLM(CharVocab.from_text("abcdefghij").to_dict(), hidden_size=16).eval()
    x = torch.randint(0, 10, (2, 24))
    y = torch.randint(0, 10, (2, 24))
    whole = F.cross_entropy(model(x)[0].reshape(-1, 10), y.reshape(-1))
    with torch.no_grad():
        halves = [model._shared_step((x[:, s], y[:, s], s.start == 0), "val") for s in (slice(0, 12), slice(12, 24))]
    torch.testing.assert_close(sum(halves) / 2, whole, rtol=0, atol=1e-6)
    # reset=True on the second half must forget the first: a different loss
    with torch.no_grad():
        fresh = model._shared_step((x[:, 12:], y[:, 12:], True), "val")
    assert not torch.allclose(fresh, halves[1])


@pytest.mark.parametrize("impl, locked", [("fused", False), ("scratch", False), ("scratch", True)])
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("num_layers", [1, 3])
def test_dropout_never_touches_the_recurrent_path(cell, num_layers, impl, locked):
    """Record every dropout output in train mode, replay exactly those in eval mode: the result must match.

    Any other dropout (on h(t-1) -> h(t), on the carried state, inside a cell loop) would make the train-mode
    result differ from the replay; every recorded dropout must act on a whole [B, T, .] sequence.
    """
    torch.manual_seed(0)
    net = rnn(V, cell=cell, num_layers=num_layers, hidden_size=32, dropout=0.5, impl=impl, locked_dropout=locked)
    x, s0 = torch.randint(0, V, (4, 12)), rand_state(net, 4)
    recorded = []
    hook = net.drop.register_forward_hook(lambda m, i, o: recorded.append((i[0], o.detach().clone())))
    net.train()
    logits, state = net(x, s0)
    hook.remove()

    assert len(recorded) == num_layers + 1  # embedding, between each pair of layers, before the decoder
    for inp, out in recorded:
        assert inp.shape[:2] == (4, 12)  # a whole sequence of the vertical connection, never one step's state
        assert ((out == 0) & (inp != 0)).any()  # and the masks really dropped units

    replay = iter(out for _, out in recorded)
    hook = net.drop.register_forward_hook(lambda m, i, o: next(replay))
    net.eval()
    logits_replayed, state_replayed = net(x, s0)
    hook.remove()
    torch.testing.assert_close(logits_replayed, logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(state_replayed, state, rtol=0, atol=1e-6)


def test_eval_mode_has_no_dropout():
    torch.manual_seed(0)
    net = rnn(V, cell="lstm", num_layers=2, hidden_size=32, dropout=0.5).eval()
    x = torch.randint(0, V, (2, 10))
    assert torch.equal(net(x)[0], net(x)[0])


def test_one_hot_input_and_tied_weights():
    net = rnn(V, cell="gru", num_layers=2, hidden_size=32, embedding_size=0, tie_weights=False)
    assert net.embedding is None and net.layers[0].input_size == V
    tied = rnn(V, cell="lstm", num_layers=2, hidden_size=32)  # the default
    assert tied.decoder.weight is tied.embedding.weight
    untied = rnn(V, cell="lstm", num_layers=2, hidden_size=32, tie_weights=False)
    assert untied.decoder.weight is not untied.embedding.weight


def test_init_scale_is_uniform_within_bounds():
    net = rnn(V, cell="lstm", num_layers=2, hidden_size=32, init_scale=0.05)
    for p in net.parameters():
        assert p.abs().max() <= 0.05 and p.abs().max() > 0.04


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dropout": 1.0}, "model.dropout=1.0 must be in [0, 1); e.g. model.dropout=0.2."),
        ({"dropout": -0.1}, "model.dropout=-0.1 must be in [0, 1)"),
        ({"num_layers": 0}, "model.num_layers=0 must be a whole number >= 1; e.g. model.num_layers=2."),
        ({"num_layers": 1.5}, "model.num_layers=1.5 must be a whole number >= 1"),
        ({"hidden_size": 0}, "model.hidden_size=0 must be a whole number >= 1"),
        (
            {"embedding_size": -1},
            "model.embedding_size=-1 must be a whole number >= 0; e.g. model.embedding_size=null.",
        ),
        ({"cell": "transformer"}, "model.cell='transformer' is not known; use one of lstm, gru, rnn_tanh"),
        ({"tie_weights": True, "embedding_size": 16}, "model.tie_weights needs embedding_size == hidden_size"),
        ({"init_scale": -1.0}, "model.init_scale=-1.0 must be positive"),
        ({"cell": ["lstm"]}, "model.cell=['lstm'] is not known"),
        ({"impl": "cudnn"}, "model.impl='cudnn' is not known; use one of fused, parallel, scratch."),
        (
            {"impl": "parallel"},
            "model.cell=lstm has no parallel implementation; use model.impl=fused or model.impl=scratch.",
        ),
        ({"locked_dropout": "no"}, "model.locked_dropout='no' must be true or false."),
        (
            {"cell": "mingru", "weight_drop": 0.2},
            "model.weight_drop drops entries of W_hh, but model.cell=mingru has no W_hh (its gates read x_t alone);"
            " set model.weight_drop=0, or regularise with model.dropout or model.locked_dropout.",
        ),
        (
            {"cell": "minlstm", "recurrent_dropout": 0.2, "impl": "scratch"},
            "model.recurrent_dropout drops h(t-1) in W_hh h(t-1), but model.cell=minlstm has no W_hh",
        ),
        ({"proj_size": -1}, "model.proj_size=-1 must be a whole number >= 0; e.g. model.proj_size=2."),
        ({"proj_size": True}, "model.proj_size=True must be a whole number >= 0"),
        (
            {"cell": "gru", "proj_size": 64},
            "model.cell=gru cannot project its h; set model.proj_size=0 or model.cell=lstm.",
        ),
        ({"cell": "minlstm", "proj_size": 64}, "model.cell=minlstm cannot project its h"),
        (
            {"hidden_size": 64, "proj_size": 64},
            "model.proj_size=64 must be smaller than model.hidden_size=64; e.g. model.proj_size=32, or 0 for no",
        ),
        (
            {"proj_size": 64, "tie_weights": True},
            "model.tie_weights needs embedding_size == proj_size (got None vs 64); set model.embedding_size=64 or",
        ),
    ],
)
def test_bad_hyperparameters_are_rejected_with_the_fix(kwargs, match):
    """RNNConfig checks itself on construction: one sentence naming the model.* setting and the fix."""
    with pytest.raises(UserError, match=re.escape(match)):
        RNNConfig(**kwargs)
    with pytest.raises(UserError, match=re.escape(match)):
        CharLM(CharVocab.from_text("ab").to_dict(), **kwargs)  # the same check, through the LightningModule


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"optimizer": "rmsprop"}, "optim.optimizer='rmsprop' is not known; use one of sgd, adam, adamw."),
        ({"scheduler": "exp"}, "optim.scheduler='exp' is not known"),
        ({"lr": 0}, "optim.lr=0 must be positive; e.g. optim.lr=0.002."),
        ({"lr": float("inf")}, "optim.lr=inf must be positive; e.g. optim.lr=0.002."),
        ({"lr": 0.01, "min_lr": 0.1}, "optim.min_lr=0.1 must be <= optim.lr=0.01; e.g. optim.min_lr=0."),
        ({"momentum": 1.0}, "optim.momentum=1.0 must be in [0, 1)"),
        ({"betas": [0.9]}, "optim.betas=[0.9] must be two numbers in [0, 1)"),
        ({"betas": 0.9}, "optim.betas=0.9 must be two numbers in [0, 1)"),
        ({"momentum": "x"}, "optim.momentum='x' must be in [0, 1); e.g. optim.momentum=0.9."),
        ({"betas": [0.9, 1.0]}, "optim.betas[1]=1.0 must be in [0, 1); e.g. optim.betas[1]=0.999."),
        ({"warmup_steps": -1}, "optim.warmup_steps=-1 must be a whole number >= 0; e.g. optim.warmup_steps=20."),
        ({"warmup_steps": 2.5}, "optim.warmup_steps=2.5 must be a whole number >= 0"),
        ({"hiden_size": 64}, "model.hiden_size is not a model setting; use one of betas, cell,"),
    ],
)
def test_bad_optimisation_settings_are_rejected(kwargs, match):
    with pytest.raises(UserError, match=re.escape(match)):
        CharLM(CharVocab.from_text("ab").to_dict(), **kwargs)


def test_min_cells_take_layer_norm_and_locked_dropout_on_every_impl():
    """Their layer norm is over W_ih x, which the scan sees too, so (unlike an LSTM's) it needs no impl=scratch.
    ``fused`` selects their parallel scan, as ``parallel`` does: they have no torch kernel."""
    for impl in ("fused", "parallel", "scratch"):
        net = rnn(V, cell="minlstm", impl=impl, layer_norm=True, locked_dropout=True, hidden_size=8)
        assert net.layers[0].norm_ih is not None and net.layers[0].parallel == (impl != "scratch")


# ---- LSTMP: an LSTM whose h is projected to proj_size = P < H (nn.LSTM(proj_size=P)) ----


@pytest.mark.parametrize("impl", ["fused", "scratch"])
def test_lstmp_layers_read_p_inputs_and_the_state_holds_h_in_its_first_p_columns(impl):
    torch.manual_seed(0)
    net = rnn(
        V, cell="lstm", impl=impl, num_layers=3, hidden_size=16, proj_size=6, embedding_size=10, tie_weights=False
    ).eval()
    shapes = [(layer.weight_ih_l0.shape[1], layer.weight_hh_l0.shape[1]) for layer in net.layers]
    assert shapes == [(10, 6), (6, 6), (6, 6)]  # W_ih [4H, in], W_hh [4H, P]
    assert all(layer.weight_hr_l0.shape == (6, 16) for layer in net.layers)
    assert net.decoder.in_features == 6
    x = torch.randint(0, V, (2, 7))
    tops = []
    hook = net.layers[-1].register_forward_hook(lambda m, i, o: tops.append(o[0]))
    _, state = net(x, rand_state(net, 2))
    hook.remove()
    assert state.shape == (2, 3, 2, 16)
    assert torch.equal(state[0, :, :, 6:], torch.zeros(3, 2, 10))  # h is P wide; C fills its slot
    assert torch.equal(state[0, -1, :, :6], tops[0][:, -1])  # h_T of the top layer is the last output
    assert (state[1] != 0).all()


@pytest.mark.parametrize("impl", ["fused", "scratch"])
def test_lstmp_carried_state_makes_two_halves_equal_the_whole(impl):
    torch.manual_seed(0)
    net = rnn(V, cell="lstm", impl=impl, num_layers=2, hidden_size=16, proj_size=5, tie_weights=False).double().eval()
    x, s0 = torch.randint(0, V, (3, 30)), rand_state(net, 3).double()  # s0's columns after P must be ignored
    whole, s_whole = net(x, s0)
    first, s_half = net(x[:, :13], s0)
    second, s_end = net(x[:, 13:], s_half)
    torch.testing.assert_close(torch.cat([first, second], 1), whole, rtol=0, atol=1e-12)
    torch.testing.assert_close(s_end, s_whole, rtol=0, atol=1e-12)


@pytest.mark.parametrize("impl", ["fused", "scratch"])
def test_lstmp_stepper_equals_the_forward_pass_at_every_position(impl):
    torch.manual_seed(0)
    net = rnn(V, cell="lstm", impl=impl, num_layers=2, hidden_size=16, proj_size=5, tie_weights=False).double().eval()
    x, s0 = torch.randint(0, V, (3, 20)), rand_state(net, 3).double()
    assert_stepper_equals_forward(net, x, s0, atol=1e-12)


def test_lstmp_ties_weights_with_a_p_wide_embedding_and_exports(tmp_path):
    net = rnn(V, cell="lstm", hidden_size=16, proj_size=8, embedding_size=8, tie_weights=True)
    assert net.decoder.weight is net.embedding.weight
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from charlm.export import export_onnx

    torch.manual_seed(0)
    model = CharLM({"chars": "abcdefg \n", "unk": None}, hidden_size=16, proj_size=6, num_layers=2, tie_weights=False)
    onnx_path, _ = export_onnx(model, tmp_path / "m.onnx")
    ids, state = torch.tensor([0, 3, 8]), torch.randn(model.net.init_state(3).shape)  # [2, L, 3, H]
    assert_onnx_step_equals_stepper(onnx_path, model, ids, state)


@pytest.mark.isa
@pytest.mark.parametrize("kernel_runs", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_fused_lstm_runs_in_fp32_where_the_cpu_has_no_half_precision_kernel(monkeypatch, dtype, kernel_runs):
    """On a CPU whose oneDNN builds no half-precision LSTM kernel (bf16 on AVX2; fp16 everywhere) the fused LSTM
    layers run in fp32 under autocast, and training goes on; where the kernel runs, they keep the autocast dtype.
    The probe is forced each way: a machine of the other kind still runs this path."""
    if kernel_runs and not charlm.hardware.cpu_lstm_kernel_runs(dtype):
        pytest.skip(f"this CPU builds no {dtype} LSTM kernel")
    monkeypatch.setattr(charlm.nn.rnn, "cpu_lstm_kernel_runs", lambda d: kernel_runs and d == dtype)
    torch.manual_seed(0)
    net = rnn(V, cell="lstm", num_layers=2, hidden_size=16)
    seen = []
    for layer in net.layers:
        layer.register_forward_pre_hook(lambda m, args: seen.append((args[0].dtype, torch.is_autocast_enabled("cpu"))))
    x = torch.randint(0, V, (2, 7))
    with torch.autocast("cpu", dtype=dtype):
        logits, _ = net(x, rand_state(net, 2))
    F.cross_entropy(logits.float().reshape(-1, V), x.reshape(-1)).backward()
    assert [autocast for _, autocast in seen] == [kernel_runs] * 2
    assert kernel_runs or [dt for dt, _ in seen] == [torch.float32] * 2
    assert all(p.grad is not None and p.grad.isfinite().all() for p in net.parameters())
