"""RNNStack: embedding -> dropout -> L recurrent layers (dropout between) -> dropout -> decoder.

Zaremba, Sutskever & Vinyals (2014): dropout only on the non-recurrent connections. With ``impl="fused"``
each layer is a single-layer torch RNN (cuDNN / oneDNN), so h(t-1) -> h(t) runs inside the kernel and no
dropout can reach it; ``self.drop`` is the only place where units are dropped. ``impl="scratch"`` runs the
same parameters through the cell equations of ``charlm.cells``, which the opt-in regularisers need.

Regularisers beyond Zaremba (all off by default, all inactive in eval mode):
- ``locked_dropout``: the same three dropouts, but one mask per sequence shared across time (variational
  dropout, Gal & Ghahramani 2016; awd-lstm-lm's LockedDropout).
- ``recurrent_dropout``: variational dropout on h(t-1) inside the recurrence (scratch only; leaves Zaremba).
- ``weight_drop``: DropConnect on every W_hh, one mask per forward call (Merity et al. 2017, AWD-LSTM);
  fused layers run on the masked matrix through ``torch.func.functional_call``.
- ``layer_norm``: layer-normalised cells (Ba et al. 2016; scratch only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from charlm import UserError
from charlm.cells import ScratchLayer, cell_step, project_input

CELLS = {
    "lstm": (nn.LSTM, {}),
    "gru": (nn.GRU, {}),
    "rnn_tanh": (nn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (nn.RNN, {"nonlinearity": "relu"}),
}

# The recurrent state of the whole stack is one tensor [S, L, B, H]: S = 2 (h, c) for LSTM, else 1 (h).
# One shape for every cell keeps carrying, detaching and resetting state a one-liner.
State = torch.Tensor
IMPLS = ("fused", "scratch")


class LockedDropout(nn.Module):
    """Dropout with one mask per sequence, shared by every timestep: x [B, T, E] * mask [B, 1, E]."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        return x * F.dropout(x.new_ones(x.shape[0], 1, x.shape[2]), self.p, training=True)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def check_hparams(
    vocab_size: int,
    cell: str,
    num_layers: int,
    hidden_size: int,
    embedding_size: int | None,
    dropout: float,
    tie_weights: bool,
    init_scale: float | None,
    impl: str = "fused",
    recurrent_dropout: float = 0.0,
    weight_drop: float = 0.0,
    layer_norm: bool = False,
) -> None:
    if cell not in CELLS:
        raise UserError(f"model.cell={cell!r} is not a known cell; use one of {', '.join(CELLS)}.")
    if num_layers < 1:
        raise UserError(f"model.num_layers={num_layers} must be at least 1; set model.num_layers=1 or more.")
    if hidden_size < 1:
        raise UserError(f"model.hidden_size={hidden_size} must be at least 1; set a positive size.")
    if embedding_size is not None and embedding_size < 0:
        raise UserError(
            f"model.embedding_size={embedding_size} must be >= 0 (0 means one-hot input, null = hidden_size)."
        )
    for name, p in (("dropout", dropout), ("recurrent_dropout", recurrent_dropout), ("weight_drop", weight_drop)):
        if not 0 <= p < 1:
            raise UserError(f"model.{name}={p} must be in [0, 1); e.g. model.{name}=0.2.")
    if impl not in IMPLS:
        raise UserError(f"model.impl={impl!r} is not known; use model.impl=fused or model.impl=scratch.")
    for name, on in (("recurrent_dropout", recurrent_dropout > 0), ("layer_norm", layer_norm)):
        if on and impl == "fused":
            raise UserError(f"model.{name} needs the cell equations, which fused kernels hide; set model.impl=scratch.")
    if init_scale is not None and init_scale <= 0:
        raise UserError(f"model.init_scale={init_scale} must be positive, or null for torch's default init.")
    if vocab_size < 1:
        raise UserError("the vocab is empty; train on a non-empty corpus.")
    if tie_weights and (embedding_size if embedding_size is not None else hidden_size) != hidden_size:
        raise UserError(
            f"model.tie_weights needs embedding_size == hidden_size (got {embedding_size} vs {hidden_size});"
            " set model.embedding_size=null or model.tie_weights=false."
        )


class RNNStack(nn.Module):
    """Character RNN language model from plain hyperparameters; ``forward`` returns logits and new state.

    ``embedding_size=None`` uses ``hidden_size``; ``embedding_size=0`` feeds one-hot vectors (d2l).
    ``init_scale`` draws every parameter from U(-s, s) as Zaremba et al. do; None keeps torch's init.
    ``impl``, ``locked_dropout``, ``recurrent_dropout``, ``weight_drop`` and ``layer_norm``: see the module doc.
    """

    def __init__(
        self,
        vocab_size: int,
        cell: str = "lstm",
        num_layers: int = 2,
        hidden_size: int = 256,
        embedding_size: int | None = None,
        dropout: float = 0.0,
        tie_weights: bool = False,
        init_scale: float | None = None,
        impl: str = "fused",
        locked_dropout: bool = False,
        recurrent_dropout: float = 0.0,
        weight_drop: float = 0.0,
        layer_norm: bool = False,
    ):
        super().__init__()
        check_hparams(
            vocab_size, cell, num_layers, hidden_size, embedding_size, dropout, tie_weights, init_scale,
            impl, recurrent_dropout, weight_drop, layer_norm,
        )  # fmt: skip
        self.vocab_size, self.cell, self.num_layers, self.hidden_size = vocab_size, cell, num_layers, hidden_size
        self.impl, self.weight_drop = impl, weight_drop
        emb = hidden_size if embedding_size is None else embedding_size
        self.embedding = nn.Embedding(vocab_size, emb) if emb else None
        in_size = emb or vocab_size
        rnn_cls, kwargs = CELLS[cell]
        sizes = [in_size] + [hidden_size] * (num_layers - 1)
        self.layers = nn.ModuleList(
            rnn_cls(n, hidden_size, batch_first=True, **kwargs)
            if impl == "fused"
            else ScratchLayer(cell, n, hidden_size, recurrent_dropout, layer_norm)
            for n in sizes
        )
        # Stateless, so one module serves every non-recurrent connection.
        self.drop = LockedDropout(dropout) if locked_dropout else nn.Dropout(dropout)
        self.decoder = nn.Linear(hidden_size, vocab_size)
        if init_scale is not None:
            for name, p in self.named_parameters():
                if ".norm_" not in name:  # layer norms keep gain 1, shift 0
                    nn.init.uniform_(p, -init_scale, init_scale)
        if tie_weights:
            self.decoder.weight = self.embedding.weight

    @property
    def state_slots(self) -> int:
        return 2 if self.cell == "lstm" else 1

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        return torch.zeros(self.state_slots, self.num_layers, batch_size, self.hidden_size, device=device)

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """x [B, T] int64, state [S, L, B, H] or None (zeros) -> logits [B, T, V], state [S, L, B, H]."""
        h = self.embedding(x) if self.embedding is not None else F.one_hot(x, self.vocab_size).float()  # [B, T, E]
        h = self.drop(h)
        if state is None:
            state = self.init_state(x.shape[0], x.device).to(h.dtype)
        new_state = []
        for k, layer in enumerate(self.layers):
            if k > 0:
                h = self.drop(h)  # between layers: the vertical, non-recurrent connection
            h, layer_state = self._run_layer(layer, h, state[:, k])  # [B, T, H], [S, B, H]
            new_state.append(layer_state)
        logits = self.decoder(self.drop(h))  # [B, T, V]
        return logits, torch.stack(new_state, dim=1)  # [S, L, B, H]

    def _run_layer(self, layer: nn.Module, h: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        weight_hh = None
        if self.training and self.weight_drop > 0:  # DropConnect: one W_hh mask for the whole batch and sequence
            weight_hh = F.dropout(layer.weight_hh_l0, self.weight_drop, training=True)
        if isinstance(layer, ScratchLayer):
            return layer(h, state, weight_hh)
        layer_state = (state[0:1], state[1:2]) if self.cell == "lstm" else state[0:1]
        if weight_hh is None:  # the recurrence h(t-1)->h(t) runs inside the fused kernel
            h, layer_state = layer(h, layer_state)
        else:
            h, layer_state = torch.func.functional_call(layer, {"weight_hh_l0": weight_hh}, (h, layer_state))
        return h, torch.cat(layer_state) if self.cell == "lstm" else layer_state

    def stepper(self) -> Stepper:
        """A frozen single-character inference step over the current weights (see ``Stepper``)."""
        return Stepper(self)


class Stepper:
    """One character per stream for inference: ``stepper(ids [N], state [S, L, N, H]) -> logits [N, V], state``.

    Runs the cell equations of ``charlm.cells`` on the weights of a fused or scratch ``RNNStack``; a length-1
    call of a fused kernel costs ~10x more on CPU. Built once per generation, because it precomputes:
    - layer 0's input projection of every token, W_ih e_v + b_ih: a row lookup replaces a matmul;
    - every other weight transposed and contiguous, so each step is a plain ``addmm``.
    It never drops anything, and it sees weight updates only when rebuilt.
    """

    @torch.no_grad()
    def __init__(self, net: RNNStack):
        self.cell, first = net.cell, net.layers[0]
        tokens = net.embedding.weight if net.embedding is not None else torch.eye(net.vocab_size).to(first.bias_ih_l0)
        self.table = project_input(first, tokens)  # [V, G*H]
        self.layers = [
            (
                (layer.weight_ih_l0.t().contiguous(), layer.bias_ih_l0, getattr(layer, "norm_ih", None)),
                (layer.weight_hh_l0.t().contiguous(), layer.bias_hh_l0, getattr(layer, "norm_hh", None)),
                getattr(layer, "norm_c", None),
            )
            for layer in net.layers
        ]
        self.decoder = (net.decoder.weight.t().contiguous(), net.decoder.bias, None)

    @staticmethod
    def _affine(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor, norm: nn.Module | None) -> torch.Tensor:
        y = torch.addmm(bias, x, weight_t)
        return y if norm is None else norm(y)

    def split(self, state: State) -> list[tuple]:
        """State [S, L, N, H] -> per layer (h [N, H], C [N, H] or None), the form ``advance`` carries."""
        return [(state[0, k], state[1, k] if self.cell == "lstm" else None) for k in range(len(self.layers))]

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        logits, layers = self.advance(ids, self.split(state))
        return logits, torch.stack([torch.stack(hc) if hc[1] is not None else hc[0][None] for hc in layers], dim=1)

    def advance(self, ids: torch.Tensor, layers: list[tuple]) -> tuple[torch.Tensor, list[tuple]]:
        """``__call__`` on a per-layer list of (h, C or None), which saves the stacking in a sampling loop."""
        x, new = ids, []
        for k, ((h, c), (proj_in, proj_hh, norm_c)) in enumerate(zip(layers, self.layers, strict=True)):
            gi = self.table[x] if k == 0 else self._affine(x, *proj_in)
            x, c = cell_step(self.cell, gi, self._affine(h, *proj_hh), h, c, norm_c)
            new.append((x, c))
        return self._affine(x, *self.decoder), new
