"""The cell registry, the recurrent cells written out once from their equations, and the layer loop over time.

A cell is one ``CellSpec`` in ``CELLS``: everything the model, the sampler, the exporter and the benches need to
know about it, so none of them asks for a cell by name. Adding a cell is one spec, one step function (the
equations of one timestep), one ``conf/model/<cell>.yaml`` and its tests; ``register_cell`` makes it a valid
``model.cell``.

Every cell splits its pre-activations into an input part ``gi = W_ih x_t + b_ih`` and a hidden part
``gh = W_hh h_(t-1) + b_hh``, with the weights laid out exactly as in ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM``
(gate order r|z|n for the GRU, i|f|g|o for the LSTM). So ``ScratchLayer`` and the fused torch layer hold the
same parameters under the same names (``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``, ``bias_hh_l0``)
and a checkpoint moves between ``model.impl=fused`` and ``model.impl=scratch`` with no conversion. A step may
read the gate blocks in another order than they are stored (``CellSpec.order``): the LSTM's step reads i|f|o|g,
so that one sigmoid covers its three gates.

With ``proj_size`` = P > 0 the LSTM is an LSTMP (Sak et al. 2014, as ``nn.LSTM(proj_size=P)``): h_t = W_hr
(o_t * tanh(C_t)) is P wide, W_hh is [4H, P], and ``weight_hr_l0`` [P, H] holds W_hr.

Speed: the input projection of all timesteps is one matmul before the loop; each step then does one
``[B, H] @ [H, G*H]`` matmul plus the cell's elementwise math.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

# One timestep: (gi [N, G*H], gh [N, G*H] or None, state (h_(t-1) [N, P], then any other slots [N, H]),
# norm of C or None) -> the new state, h_t first, before any projection. gh is None where the cell has no W_hh,
# and where the caller has already added it to gi (``CellSpec.summed``).
Step = Callable[..., tuple[torch.Tensor, ...]]


@dataclass(frozen=True, kw_only=True)
class CellSpec:
    """Everything that differs between cells; every other module reads these fields, never the cell's name."""

    name: str  # the model.cell value
    blocks: int  # G: blocks of H rows in W_ih (and W_hh), as stored, e.g. 4 for the LSTM's i|f|g|o
    step: Step  # one timestep (see ``Step``): the cell's equations, the one place they are written
    slots: int = 1  # state tensors per layer, h first: 2 for the LSTM (h, C); each [N, H] in the [S, L, N, H] state
    recurrent: bool = True  # has W_hh and b_hh; False: every gate reads x_t alone (weight-drop has nothing to drop)
    summed: bool = False  # step reads only gi + gh: the sampler may compute both in one matmul, biases folded
    order: tuple[int, ...] | None = None  # the stored gate blocks in the order step reads them; None: as stored
    fused: tuple[type[nn.Module], dict] | None = None  # torch's kernel that impl=fused builds, and its kwargs
    parallel: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # all timesteps at once:
    # gi [B, T, G*H], h_0 [B, H] -> h [B, T, H]; what impl=parallel (and impl=fused, lacking a kernel) trains with
    projects: bool = False  # accepts proj_size (LSTMP): h_t = W_hr h'_t is P wide; needs a memory besides h
    norm_c: bool = False  # layer_norm also normalises slot 1 (the LSTM's C) inside the step

    def __post_init__(self) -> None:
        if self.parallel is not None and self.recurrent:
            raise ValueError(f"cell {self.name}: a parallel form needs gates that read x_t alone (recurrent=False)")
        if self.summed and not self.recurrent:
            raise ValueError(f"cell {self.name}: summed adds W_hh h to W_ih x, so it needs W_hh (recurrent=True)")
        if not self.recurrent and self.slots != 1:
            raise ValueError(f"cell {self.name}: a cell without W_hh carries h alone (slots=1)")
        if (self.norm_c or self.projects) and self.slots < 2:
            raise ValueError(f"cell {self.name}: norm_c and projects act on a memory C besides h (slots=2)")
        if self.order is not None and sorted(self.order) != list(range(self.blocks)):
            raise ValueError(f"cell {self.name}: order must list each of the {self.blocks} blocks once")


# model.cell -> its spec, in registration order: the four below, then minGRU and minLSTM, which charlm.nn.mincells
# registers beside their equations (charlm.nn.rnn imports it, so the registry is whole wherever a model is built).
CELLS: dict[str, CellSpec] = {}


def register_cell(spec: CellSpec) -> CellSpec:
    """Make ``spec.name`` a valid ``model.cell``; returns ``spec``. A name is registered once."""
    if spec.name in CELLS:
        raise ValueError(f"cell {spec.name!r} is registered already")
    CELLS[spec.name] = spec
    return spec


def cells_with(test: Callable[[CellSpec], object]) -> list[str]:
    """The registered cells whose spec passes ``test``, e.g. ``cells_with(lambda s: s.projects)``."""
    return [name for name, spec in CELLS.items() if test(spec)]


def rnn_step(gi: torch.Tensor, gh: torch.Tensor | None, state, norm_c=None, *, relu: bool = False):
    """Vanilla RNN: h_t = f(W_x x_t + W_h h_(t-1) + b), f = tanh or relu."""
    pre = gi if gh is None else gi + gh
    return (torch.relu(pre) if relu else torch.tanh(pre),)


def gru_step(gi: torch.Tensor, gh: torch.Tensor, state, norm_c=None):
    """GRU (Cho et al. 2014, as in nn.GRU):
    r_t = sigmoid(W_ir x_t + b_ir + W_hr h_(t-1) + b_hr)             reset gate
    z_t = sigmoid(W_iz x_t + b_iz + W_hz h_(t-1) + b_hz)             update gate
    n_t = tanh(W_in x_t + b_in + r_t * (W_hn h_(t-1) + b_hn))        candidate h~_t
    h_t = z_t * h_(t-1) + (1 - z_t) * n_t
    """
    (h,) = state
    i_r, i_z, i_n = gi.chunk(3, -1)
    h_r, h_z, h_n = gh.chunk(3, -1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return (n + z * (h - n),)  # = z * h + (1 - z) * n


def lstm_step(gi: torch.Tensor, gh: torch.Tensor | None, state, norm_c=None):
    """LSTM (Hochreiter & Schmidhuber 1997, with forget gate, as in nn.LSTM), gate blocks read as i|f|o|g:
    i_t, f_t, o_t = sigmoid(W_i* x_t + b_i* + W_h* h_(t-1) + b_h*)    input, forget, output gates
    C~_t = tanh(W_ig x_t + b_ig + W_hg h_(t-1) + b_hg)               candidate cell
    C_t = f_t * C_(t-1) + i_t * C~_t
    h_t = o_t * tanh(C_t)                                            (tanh(LN(C_t)) in the layer-norm LSTM)
    The three gates are one sigmoid, and C_t one fused multiply-add. The LSTMP's W_hr is the caller's.
    """
    c = state[1]  # [N, H]
    sig, g = (gi if gh is None else gi + gh).split([3 * c.shape[-1], c.shape[-1]], -1)
    i, f, o = torch.sigmoid(sig).chunk(3, -1)
    c = torch.addcmul(f * c, i, torch.tanh(g))
    return o * torch.tanh(c if norm_c is None else norm_c(c)), c  # [N, H], [N, H]


register_cell(
    CellSpec(
        name="lstm",
        blocks=4,
        step=lstm_step,
        slots=2,
        summed=True,
        order=(0, 1, 3, 2),  # stored i|f|g|o (nn.LSTM), read i|f|o|g
        fused=(nn.LSTM, {}),
        projects=True,
        norm_c=True,
    )
)
register_cell(CellSpec(name="gru", blocks=3, step=gru_step, fused=(nn.GRU, {})))
register_cell(CellSpec(name="rnn_tanh", blocks=1, step=rnn_step, summed=True, fused=(nn.RNN, {"nonlinearity": "tanh"})))
register_cell(
    CellSpec(
        name="rnn_relu",
        blocks=1,
        step=partial(rnn_step, relu=True),
        summed=True,
        fused=(nn.RNN, {"nonlinearity": "relu"}),
    )
)


def gate_rows(spec: CellSpec, hidden_size: int, device: torch.device | None = None) -> torch.Tensor | None:
    """Indices of the stored G*H rows in the order ``spec.step`` reads them; None where that is the stored one."""
    if spec.order is None:
        return None
    return torch.cat([torch.arange(b * hidden_size, (b + 1) * hidden_size, device=device) for b in spec.order])


class Projection(NamedTuple):
    """``x -> norm(x W^T + b)``: one of a layer's two projections, its rows in the order the cell's step reads."""

    weight: torch.Tensor  # [G*H, in]
    bias: torch.Tensor  # [G*H]
    norm: Callable[[torch.Tensor], torch.Tensor] | None  # the layer norm over the G*H outputs, if any

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y if self.norm is None else self.norm(y)


def _projection(weight, bias, norm: nn.LayerNorm | None, rows: torch.Tensor | None) -> Projection:
    if rows is None:
        return Projection(weight, bias, norm)
    if norm is not None:  # LN's mean and variance ignore the order of the rows; its gain and shift follow them
        shape, gain, shift, eps = norm.normalized_shape, norm.weight[rows], norm.bias[rows], norm.eps
        norm = partial(F.layer_norm, normalized_shape=shape, weight=gain, bias=shift, eps=eps)
    return Projection(weight[rows], bias[rows], norm)


def projections(
    layer: nn.Module, spec: CellSpec, weight_hh: torch.Tensor | None = None
) -> tuple[Projection, Projection | None]:
    """The input and hidden projections of ``layer`` (a scratch, min or fused single-layer torch layer: all hold
    the same parameters) as ``spec.step`` reads them; the hidden one is None for a cell without W_hh.
    ``weight_hh`` stands in for W_hh when given (weight-drop)."""
    rows = gate_rows(spec, layer.weight_ih_l0.shape[0] // spec.blocks, layer.weight_ih_l0.device)
    ih = _projection(layer.weight_ih_l0, layer.bias_ih_l0, getattr(layer, "norm_ih", None), rows)
    if not spec.recurrent:
        return ih, None
    w_hh = layer.weight_hh_l0 if weight_hh is None else weight_hh
    return ih, _projection(w_hh, layer.bias_hh_l0, getattr(layer, "norm_hh", None), rows)


class ScratchLayer(nn.Module):
    """One recurrent layer unrolled in Python over time (d2l's ``RNNScratch`` / ``StackedRNNScratch`` idea).

    Beyond what the fused kernels can do:
    - ``recurrent_dropout``: variational dropout on h_(t-1) in W_hh h_(t-1) (Gal & Ghahramani 2016); one mask
      per sequence, the same at every step. This is dropout ON the recurrent connection, so it deliberately
      leaves Zaremba's scheme; it is off by default.
    - ``layer_norm``: layer-normalised cell (Ba et al. 2016): LN over W_ih x and W_hh h separately, and over
      C_t before its tanh for the LSTM (``CellSpec.norm_c``).
    Weight-drop on W_hh is applied by the caller (``RNNStack``), identically for fused and scratch layers.
    ``proj_size`` = P > 0 (``CellSpec.projects``): the LSTMP of the module doc, parameters as
    ``nn.LSTM(proj_size=P)``.
    """

    def __init__(
        self,
        cell: str,
        input_size: int,
        hidden_size: int,
        recurrent_dropout: float = 0.0,
        layer_norm: bool = False,
        proj_size: int = 0,
    ):
        super().__init__()
        self.spec = CELLS[cell]
        self.cell, self.hidden_size, self.recurrent_dropout = cell, hidden_size, recurrent_dropout
        self.output_size = proj_size or hidden_size  # the width of h_t
        gh = self.spec.blocks * hidden_size
        self.weight_ih_l0 = nn.Parameter(torch.empty(gh, input_size))
        self.weight_hh_l0 = nn.Parameter(torch.empty(gh, self.output_size))
        self.bias_ih_l0 = nn.Parameter(torch.empty(gh))
        self.bias_hh_l0 = nn.Parameter(torch.empty(gh))
        self.weight_hr_l0 = nn.Parameter(torch.empty(proj_size, hidden_size)) if proj_size else None
        bound = 1 / math.sqrt(hidden_size)  # nn.RNN's init
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)
        self.norm_ih = nn.LayerNorm(gh) if layer_norm else None
        self.norm_hh = nn.LayerNorm(gh) if layer_norm else None
        self.norm_c = nn.LayerNorm(hidden_size) if layer_norm and self.spec.norm_c else None

    def forward(
        self, x: torch.Tensor, state: torch.Tensor, weight_hh: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, I], state [S, B, H] (S = ``CellSpec.slots``) -> outputs [B, T, P], final state [S, B, H].

        P = H but for the LSTMP, whose h [B, P] fills the first P columns of its state slot (zeros after them).
        ``weight_hh`` replaces W_hh for this call (weight-drop passes the masked matrix)."""
        ih, hh = projections(self, self.spec, weight_hh)
        gis = ih(x).transpose(0, 1)  # [T, B, G*H]: contiguous rows per step below
        slots = (state[0, :, : self.output_size], *state[1:])  # h [B, P], then C [B, H] for the LSTM
        mask = None
        if self.training and self.recurrent_dropout > 0:  # one mask per sequence, shared by every step
            mask = F.dropout(torch.ones_like(slots[0]), self.recurrent_dropout, training=True)
        outs = []
        for gi in gis:
            h = slots[0]
            h, *rest = self.spec.step(gi, hh(h if mask is None else h * mask), slots, self.norm_c)
            if self.weight_hr_l0 is not None:
                h = F.linear(h, self.weight_hr_l0)  # [B, P]
            slots = (h, *rest)
            outs.append(h)
        h = F.pad(slots[0], (0, self.hidden_size - self.output_size))  # [B, H]: the state's width
        return torch.stack(outs, dim=1), torch.stack((h, *slots[1:]))
