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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from charlm import UserError
from charlm.cells import ScratchLayer

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


@dataclass(frozen=True, kw_only=True)
class RNNConfig:
    """The network's hyperparameters: the one place that lists them and their defaults (``python train.py``'s).

    ``embedding_size=None`` uses ``hidden_size``; ``embedding_size=0`` feeds one-hot vectors (d2l).
    ``init_scale`` draws every parameter from U(-s, s) as Zaremba et al. do; None keeps torch's init.
    ``impl``, ``locked_dropout``, ``recurrent_dropout``, ``weight_drop`` and ``layer_norm``: see the module doc.
    Validated on construction; every error is one sentence naming the ``model.*`` setting to change.
    """

    cell: str = "lstm"  # lstm | gru | rnn_tanh | rnn_relu
    num_layers: int = 2
    hidden_size: int = 256
    embedding_size: int | None = None  # None: = hidden_size; 0: one-hot input (d2l)
    dropout: float = 0.3  # Zaremba: after the embedding, between layers, before the decoder; never recurrent
    tie_weights: bool = False  # share embedding and decoder weights (needs embedding_size = hidden_size)
    init_scale: float | None = None  # U(-s, s) init for every weight (Zaremba); None: torch's default
    impl: str = "fused"  # fused: torch's cuDNN/oneDNN kernels | scratch: the cell equations of charlm/cells.py
    locked_dropout: bool = False  # one dropout mask per sequence, shared across time (Gal & Ghahramani)
    recurrent_dropout: float = 0.0  # variational dropout on h(t-1); impl=scratch only (leaves Zaremba)
    weight_drop: float = 0.0  # DropConnect on W_hh, one mask per batch (AWD-LSTM); fused or scratch
    layer_norm: bool = False  # layer-normalised cells (Ba et al.); impl=scratch only

    def __post_init__(self) -> None:
        if not isinstance(self.cell, str) or self.cell not in CELLS:
            raise UserError(f"model.cell={self.cell!r} is not a known cell; use one of {', '.join(CELLS)}.")
        for name, minimum in (("num_layers", 1), ("hidden_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise UserError(f"model.{name}={value!r} must be a whole number >= {minimum}; e.g. model.{name}=2.")
        emb = self.embedding_size
        if emb is not None and (isinstance(emb, bool) or not isinstance(emb, int) or emb < 0):
            raise UserError(f"model.embedding_size={emb!r} must be >= 0 (0 means one-hot input, null = hidden_size).")
        for name in ("dropout", "recurrent_dropout", "weight_drop"):
            p = getattr(self, name)
            if isinstance(p, bool) or not isinstance(p, int | float) or not 0 <= p < 1:
                raise UserError(f"model.{name}={p!r} must be in [0, 1); e.g. model.{name}=0.2.")
        for name in ("tie_weights", "locked_dropout", "layer_norm"):
            if not isinstance(getattr(self, name), bool):
                raise UserError(f"model.{name}={getattr(self, name)!r} must be true or false.")
        if not isinstance(self.impl, str) or self.impl not in IMPLS:
            raise UserError(f"model.impl={self.impl!r} is not known; use model.impl=fused or model.impl=scratch.")
        for name, on in (("recurrent_dropout", self.recurrent_dropout > 0), ("layer_norm", self.layer_norm)):
            if on and self.impl == "fused":
                raise UserError(
                    f"model.{name} needs the cell equations, which fused kernels hide; set model.impl=scratch."
                )
        scale = self.init_scale
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int | float) or not scale > 0):
            raise UserError(f"model.init_scale={scale!r} must be positive, or null for torch's default init.")
        if self.tie_weights and self.input_size != self.hidden_size:
            raise UserError(
                f"model.tie_weights needs embedding_size == hidden_size (got {emb} vs {self.hidden_size});"
                " set model.embedding_size=null or model.tie_weights=false."
            )

    @property
    def input_size(self) -> int:
        """The embedding width (0: one-hot input)."""
        return self.hidden_size if self.embedding_size is None else self.embedding_size


class RNNStack(nn.Module):
    """Character RNN language model over ``vocab_size`` tokens; ``forward`` returns logits and new state."""

    def __init__(self, vocab_size: int, cfg: RNNConfig | None = None):
        super().__init__()
        cfg = RNNConfig() if cfg is None else cfg
        if vocab_size < 1:
            raise UserError("the vocab is empty; train on a non-empty corpus.")
        self.cfg, self.vocab_size = cfg, vocab_size
        self.cell, self.num_layers, self.hidden_size = cfg.cell, cfg.num_layers, cfg.hidden_size
        self.impl, self.weight_drop = cfg.impl, cfg.weight_drop
        emb = cfg.input_size
        self.embedding = nn.Embedding(vocab_size, emb) if emb else None
        in_size = emb or vocab_size
        rnn_cls, kwargs = CELLS[cfg.cell]
        sizes = [in_size] + [cfg.hidden_size] * (cfg.num_layers - 1)
        self.layers = nn.ModuleList(
            rnn_cls(n, cfg.hidden_size, batch_first=True, **kwargs)
            if cfg.impl == "fused"
            else ScratchLayer(cfg.cell, n, cfg.hidden_size, cfg.recurrent_dropout, cfg.layer_norm)
            for n in sizes
        )
        # Stateless, so one module serves every non-recurrent connection.
        self.drop = LockedDropout(cfg.dropout) if cfg.locked_dropout else nn.Dropout(cfg.dropout)
        self.decoder = nn.Linear(cfg.hidden_size, vocab_size)
        if cfg.init_scale is not None:
            for name, p in self.named_parameters():
                if ".norm_" not in name:  # layer norms keep gain 1, shift 0
                    nn.init.uniform_(p, -cfg.init_scale, cfg.init_scale)
        if cfg.tie_weights:
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
