"""RNNStack: embedding -> dropout -> L recurrent layers (dropout between) -> dropout -> decoder.

Zaremba, Sutskever & Vinyals (2014): dropout only on the non-recurrent connections. With ``impl="fused"``
each layer is a single-layer torch RNN (cuDNN / oneDNN), so h(t-1) -> h(t) runs inside the kernel and no
dropout can reach it; ``self.drop`` is the only place where units are dropped. ``impl="scratch"`` runs the
same parameters through the cell equations of ``charlm.nn.cells``, which the opt-in regularisers need.

Regularisers beyond Zaremba (all off by default, all inactive in eval mode):
- ``locked_dropout``: the same three dropouts, but one mask per sequence shared across time (variational
  dropout, Gal & Ghahramani 2016; awd-lstm-lm's LockedDropout).
- ``recurrent_dropout``: variational dropout on h(t-1) inside the recurrence (scratch only; leaves Zaremba).
- ``weight_drop``: DropConnect on every W_hh, one mask per forward call (Merity et al. 2017, AWD-LSTM);
  fused layers run on the masked matrix through ``torch.func.functional_call``.
- ``layer_norm``: layer-normalised cells (Ba et al. 2016): the step equations or a parallel form, not a kernel.

The cell is a ``CellSpec`` of ``charlm.nn.cells.CELLS``, and every choice below that depends on the cell reads it.
``impl`` picks how a layer runs: ``fused``, the fastest whole-sequence form (torch's kernel, or for a cell without
one, such as minGRU and minLSTM, its parallel scan); ``parallel``, that scan by its own name; ``scratch``, the
cell's step equations looped over time in Python. A cell without W_hh refuses weight-drop and recurrent
dropout; layer norm (of W_ih x) and every dropout above apply to it on any impl.
``proj_size`` = P > 0 makes an LSTM an LSTMP, whose h is P wide: the layer above and the decoder take P inputs.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from charlm import UserError
from charlm.checks import choice, flag, number, options, whole
from charlm.hardware import cpu_lstm_kernel_runs
from charlm.nn.cells import CELLS, ScratchLayer
from charlm.nn.mincells import MinLayer

# The recurrent state of the whole stack is one tensor [S, L, B, H]: S = the cell's slots (2 for the LSTM: h and
# C), L layers. One shape for every cell keeps carrying, detaching and resetting state a one-liner. An LSTMP's h
# is only P < H wide: it fills the first P columns of its slot, and the rest stay zero.
State = torch.Tensor
Impl = Literal["fused", "parallel", "scratch"]


def impls(cell: str) -> list[str]:
    """The ``model.impl`` values ``cell`` runs with: ``fused`` needs a torch kernel or a parallel form."""
    spec = CELLS[cell]
    has = {"fused": spec.fused is not None or spec.parallel is not None, "parallel": spec.parallel is not None}
    return [impl for impl in options(Impl) if has.get(impl, True)]


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
    ``tie_weights`` is on by default (Press & Wolf 2017): the decoder reuses the embedding matrix, fewer
    parameters that train to a lower loss on the default run (README, Results); an embedding of another width
    (one-hot, or not the LSTMP's proj_size) needs ``tie_weights=False``.
    ``init_scale`` draws every parameter from U(-s, s) as Zaremba et al. do; None keeps torch's init.
    ``impl``, ``locked_dropout``, ``recurrent_dropout``, ``weight_drop`` and ``layer_norm``: see the module doc.
    Validated on construction; every error is one sentence naming the ``model.*`` setting to change.
    """

    cell: str = "lstm"  # a registered cell (charlm.nn.cells.CELLS): lstm | gru | rnn_tanh | rnn_relu | mingru | minlstm
    num_layers: int = 2
    hidden_size: int = 256
    embedding_size: int | None = None  # None: = hidden_size; 0: one-hot input (d2l)
    dropout: float = 0.3  # Zaremba: after the embedding, between layers, before the decoder; never recurrent
    tie_weights: bool = True  # share embedding and decoder weights (needs embedding_size = hidden_size, or proj_size)
    init_scale: float | None = None  # U(-s, s) init for every weight (Zaremba); None: torch's default
    impl: Impl = "fused"  # fused: torch's kernel, else the cell's parallel form | parallel | scratch: its equations
    locked_dropout: bool = False  # one dropout mask per sequence, shared across time (Gal & Ghahramani)
    recurrent_dropout: float = 0.0  # variational dropout on h(t-1); impl=scratch only (leaves Zaremba)
    weight_drop: float = 0.0  # DropConnect on W_hh, one mask per batch (AWD-LSTM); fused or scratch
    layer_norm: bool = False  # layer-normalised cells (Ba et al.); not in torch's fused kernels
    proj_size: int = 0  # LSTMP: h_t = W_hr (o_t * tanh C_t), P < hidden_size wide (cell=lstm); 0: no projection

    def __post_init__(self) -> None:
        spec = CELLS[choice("model.cell", self.cell, CELLS)]
        for name in ("num_layers", "hidden_size", "proj_size"):
            whole(f"model.{name}", getattr(self, name), 0 if name == "proj_size" else 1, example=2)
        if self.embedding_size is not None:  # null: as wide as hidden_size
            whole("model.embedding_size", self.embedding_size, 0, example="null")
        for name in ("dropout", "recurrent_dropout", "weight_drop"):
            number(f"model.{name}", getattr(self, name), 0, 1, high_open=True, example=0.2)
        for name in ("tie_weights", "locked_dropout", "layer_norm"):
            flag(f"model.{name}", getattr(self, name))
        if self.init_scale is not None:  # null: torch's default init
            number("model.init_scale", self.init_scale, 0, low_open=True, example=0.05)
        choice("model.impl", self.impl, Impl)
        if self.impl not in impls(self.cell):
            raise UserError(
                f"model.cell={self.cell} has no {self.impl} implementation;"
                f" use model.impl={' or model.impl='.join(impls(self.cell))}."
            )
        if not spec.recurrent:
            for name, what in (
                ("weight_drop", "drops entries of W_hh"),
                ("recurrent_dropout", "drops h(t-1) in W_hh h(t-1)"),
            ):
                if getattr(self, name) > 0:
                    raise UserError(
                        f"model.{name} {what}, but model.cell={self.cell} has no W_hh (its gates read x_t alone);"
                        f" set model.{name}=0, or regularise with model.dropout or model.locked_dropout."
                    )
        if self.proj_size and not spec.projects:
            cells = " or ".join(f"model.cell={name}" for name, s in CELLS.items() if s.projects)
            raise UserError(f"model.cell={self.cell} cannot project its h; set model.proj_size=0 or {cells}.")
        if self.proj_size >= self.hidden_size:
            raise UserError(
                f"model.proj_size={self.proj_size} must be smaller than model.hidden_size={self.hidden_size};"
                f" e.g. model.proj_size={self.hidden_size // 2}, or 0 for no projection."
            )
        for name, on in (("recurrent_dropout", self.recurrent_dropout > 0), ("layer_norm", self.layer_norm)):
            if on and self.kernel:
                raise UserError(
                    f"model.{name} needs the cell equations, which fused kernels hide; set model.impl=scratch."
                )
        if self.tie_weights and self.input_size != self.output_size:
            emb = self.embedding_size
            if self.proj_size:
                raise UserError(
                    f"model.tie_weights needs embedding_size == proj_size (got {emb} vs {self.proj_size});"
                    f" set model.embedding_size={self.proj_size} or model.tie_weights=false."
                )
            raise UserError(
                f"model.tie_weights needs embedding_size == hidden_size (got {emb} vs {self.hidden_size});"
                " set model.embedding_size=null or model.tie_weights=false."
            )

    @property
    def kernel(self) -> bool:
        """Whether the layers are torch's fused kernel (``impl=fused`` for a cell that has one)."""
        return self.impl == "fused" and CELLS[self.cell].fused is not None

    @property
    def input_size(self) -> int:
        """The embedding width (0: one-hot input)."""
        return self.hidden_size if self.embedding_size is None else self.embedding_size

    @property
    def output_size(self) -> int:
        """The width of each layer's h: what the next layer and the decoder take."""
        return self.proj_size or self.hidden_size


# The RNNConfig fields that fix the shapes of the weights: a resume must keep them, and init_from takes them.
ARCHITECTURE = ("cell", "num_layers", "hidden_size", "proj_size", "embedding_size", "tie_weights", "layer_norm")


def make_layer(cfg: RNNConfig, input_size: int) -> nn.Module:
    """One recurrent layer of ``cfg``: torch's fused kernel, a ``ScratchLayer`` (the step loop of a cell with
    W_hh) or a ``MinLayer`` (a cell whose gates read x_t alone: its parallel form or its step loop)."""
    spec = CELLS[cfg.cell]
    if cfg.kernel:
        kernel, kwargs = spec.fused
        proj = {"proj_size": cfg.proj_size} if cfg.proj_size else {}  # nn.GRU / nn.RNN refuse the argument
        return kernel(input_size, cfg.hidden_size, batch_first=True, **kwargs, **proj)
    if not spec.recurrent:
        parallel = cfg.impl != "scratch"
        return MinLayer(cfg.cell, input_size, cfg.hidden_size, parallel=parallel, layer_norm=cfg.layer_norm)
    return ScratchLayer(
        cfg.cell, input_size, cfg.hidden_size, cfg.recurrent_dropout, cfg.layer_norm, proj_size=cfg.proj_size
    )


class RNNStack(nn.Module):
    """Character RNN language model over ``vocab_size`` tokens; ``forward`` returns logits and new state."""

    def __init__(self, vocab_size: int, cfg: RNNConfig | None = None):
        super().__init__()
        cfg = RNNConfig() if cfg is None else cfg
        if vocab_size < 1:
            raise UserError("the vocab is empty; train on a non-empty corpus.")
        self.cfg, self.vocab_size = cfg, vocab_size
        self.cell, self.num_layers, self.hidden_size = cfg.cell, cfg.num_layers, cfg.hidden_size
        self.spec = CELLS[cfg.cell]
        self.impl, self.weight_drop = cfg.impl, cfg.weight_drop
        emb = cfg.input_size
        self.embedding = nn.Embedding(vocab_size, emb) if emb else None
        in_size = emb or vocab_size
        sizes = [in_size] + [cfg.output_size] * (cfg.num_layers - 1)
        self.layers = nn.ModuleList(make_layer(cfg, n) for n in sizes)
        # Stateless, so one module serves every non-recurrent connection.
        self.drop = LockedDropout(cfg.dropout) if cfg.locked_dropout else nn.Dropout(cfg.dropout)
        self.decoder = nn.Linear(cfg.output_size, vocab_size)
        if cfg.init_scale is not None:
            for name, p in self.named_parameters():
                if ".norm_" not in name:  # layer norms keep gain 1, shift 0
                    nn.init.uniform_(p, -cfg.init_scale, cfg.init_scale)
        if cfg.tie_weights:
            self.decoder.weight = self.embedding.weight

    @property
    def state_slots(self) -> int:
        return self.spec.slots

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
            h, layer_state = self._run_layer(layer, h, state[:, k])  # [B, T, P], [S, B, H] (P = H but for LSTMP)
            new_state.append(layer_state)
        logits = self.decoder(self.drop(h))  # [B, T, V]
        return logits, torch.stack(new_state, dim=1)  # [S, L, B, H]

    def _run_layer(self, layer: nn.Module, h: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        weight_hh = None
        if self.training and self.weight_drop > 0:  # DropConnect: one W_hh mask for the whole batch and sequence
            weight_hh = F.dropout(layer.weight_hh_l0, self.weight_drop, training=True)
        if not isinstance(layer, nn.RNNBase):  # a ScratchLayer or MinLayer: [S, B, H] in and out
            return layer(h, state, weight_hh)
        # torch's kernels take h [1, B, P] alone, or the tuple (h, C) where the cell carries a memory too
        p = self.cfg.output_size
        layer_state = (state[0:1, :, :p], *state[1:].split(1)) if self.spec.slots > 1 else state[0:1]
        fp32 = isinstance(layer, nn.LSTM) and _cpu_lstm_needs_fp32(h)
        if fp32:
            h, layer_state = h.float(), tuple(s.float() for s in layer_state)
        with torch.autocast("cpu", enabled=False) if fp32 else nullcontext():
            if weight_hh is None:  # the recurrence h(t-1)->h(t) runs inside the fused kernel
                h, layer_state = layer(h, layer_state)
            else:
                h, layer_state = torch.func.functional_call(layer, {"weight_hh_l0": weight_hh}, (h, layer_state))
        if self.spec.slots == 1:
            return h, layer_state
        h_n, *rest = layer_state  # [1, B, P], then [1, B, H] each
        return h, torch.cat((F.pad(h_n, (0, self.hidden_size - p)), *rest))  # [S, B, H]


def _cpu_lstm_needs_fp32(h: torch.Tensor) -> bool:
    """Whether ``h`` is computed under CPU autocast to a dtype torch's fused LSTM kernel has no build for on this
    CPU (fp16, as the tests run a GPU's ``16-mixed`` path on the CPU; bf16 on CPUs without AVX-512). The fused
    LSTM layer then runs in fp32; GRU and RNN layers have kernels for both, and GPUs are untouched."""
    if h.device.type != "cpu" or not torch.is_autocast_enabled("cpu"):
        return False
    return not cpu_lstm_kernel_runs(torch.get_autocast_dtype("cpu"))
