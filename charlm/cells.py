"""The recurrent cells, written out once from their equations, plus the layer loop over time.

Every cell splits its pre-activations into an input part ``gi = W_ih x_t + b_ih`` and a hidden part
``gh = W_hh h_(t-1) + b_hh``, with the weights laid out exactly as in ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM``
(gate order r|z|n for the GRU, i|f|g|o for the LSTM). So ``ScratchLayer`` and the fused torch layer hold the
same parameters under the same names (``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``, ``bias_hh_l0``)
and a checkpoint moves between ``model.impl=fused`` and ``model.impl=scratch`` with no conversion.

With ``proj_size`` = P > 0 the LSTM is an LSTMP (Sak et al. 2014, as ``nn.LSTM(proj_size=P)``): h_t = W_hr
(o_t * tanh(C_t)) is P wide, W_hh is [4H, P], and ``weight_hr_l0`` [P, H] holds W_hr.

Speed: the input projection of all timesteps is one matmul before the loop; each step then does one
``[B, H] @ [H, G*H]`` matmul plus the cell's elementwise math.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}  # blocks of H rows in W_ih and W_hh


def rnn_cell(gi: torch.Tensor, gh: torch.Tensor | None, relu: bool = False) -> torch.Tensor:
    """Vanilla RNN: h_t = f(W_x x_t + W_h h_(t-1) + b), f = tanh or relu. ``gh=None``: ``gi`` is the sum already."""
    pre = gi if gh is None else gi + gh
    return torch.relu(pre) if relu else torch.tanh(pre)


def gru_cell(gi: torch.Tensor, gh: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """GRU (Cho et al. 2014, as in nn.GRU):
    r_t = sigmoid(W_ir x_t + b_ir + W_hr h_(t-1) + b_hr)             reset gate
    z_t = sigmoid(W_iz x_t + b_iz + W_hz h_(t-1) + b_hz)             update gate
    n_t = tanh(W_in x_t + b_in + r_t * (W_hn h_(t-1) + b_hn))        candidate h~_t
    h_t = z_t * h_(t-1) + (1 - z_t) * n_t
    """
    i_r, i_z, i_n = gi.chunk(3, -1)
    h_r, h_z, h_n = gh.chunk(3, -1)
    r = torch.sigmoid(i_r + h_r)
    z = torch.sigmoid(i_z + h_z)
    n = torch.tanh(i_n + r * h_n)
    return n + z * (h - n)  # = z * h + (1 - z) * n


def lstm_cell(
    gi: torch.Tensor, gh: torch.Tensor | None, c: torch.Tensor, norm_c=None, weight_hr: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """LSTM (Hochreiter & Schmidhuber 1997, with forget gate, as in nn.LSTM):
    i_t, f_t, o_t = sigmoid(W_i* x_t + b_i* + W_h* h_(t-1) + b_h*)    input, forget, output gates
    C~_t = tanh(W_ig x_t + b_ig + W_hg h_(t-1) + b_hg)               candidate cell
    C_t = f_t * C_(t-1) + i_t * C~_t
    h_t = o_t * tanh(C_t)                                            (tanh(LN(C_t)) in the layer-norm LSTM)
    h_t = W_hr (o_t * tanh(C_t))                                     with a projection (LSTMP): [N, P]
    """
    i, f, g, o = (gi if gh is None else gi + gh).chunk(4, -1)  # gh=None: gi holds both projections
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c if norm_c is None else norm_c(c))  # [N, H]
    return (h if weight_hr is None else F.linear(h, weight_hr)), c


def cell_step(
    cell: str,
    gi: torch.Tensor,
    gh: torch.Tensor | None,
    h: torch.Tensor,
    c: torch.Tensor | None,
    norm_c=None,
    weight_hr: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One timestep of ``cell`` from its two projections: (h_(t-1), C_(t-1)) -> (h_t, C_t); C is None but for LSTM.

    ``weight_hr`` [P, H]: the LSTM's projection, if it has one."""
    if cell == "lstm":
        return lstm_cell(gi, gh, c, norm_c, weight_hr)
    if cell == "gru":
        return gru_cell(gi, gh, h), None
    return rnn_cell(gi, gh, relu=cell == "rnn_relu"), None


def project_input(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """W_ih x + b_ih for any leading shape, e.g. all timesteps [B, T, I] -> [B, T, G*H] in one matmul.

    ``layer`` is a ``ScratchLayer`` or a fused single-layer torch RNN: both hold the same parameters."""
    gi = F.linear(x, layer.weight_ih_l0, layer.bias_ih_l0)
    norm = getattr(layer, "norm_ih", None)
    return gi if norm is None else norm(gi)


def project_hidden(layer: nn.Module, h: torch.Tensor, weight_hh: torch.Tensor | None = None) -> torch.Tensor:
    """W_hh h + b_hh; ``weight_hh`` stands in for W_hh when given (weight-drop)."""
    gh = F.linear(h, layer.weight_hh_l0 if weight_hh is None else weight_hh, layer.bias_hh_l0)
    norm = getattr(layer, "norm_hh", None)
    return gh if norm is None else norm(gh)


class ScratchLayer(nn.Module):
    """One recurrent layer unrolled in Python over time (d2l's ``RNNScratch`` / ``StackedRNNScratch`` idea).

    Beyond what the fused kernels can do:
    - ``recurrent_dropout``: variational dropout on h_(t-1) in W_hh h_(t-1) (Gal & Ghahramani 2016); one mask
      per sequence, the same at every step. This is dropout ON the recurrent connection, so it deliberately
      leaves Zaremba's scheme; it is off by default.
    - ``layer_norm``: layer-normalised cell (Ba et al. 2016): LN over W_ih x and W_hh h separately, and over
      C_t before its tanh for the LSTM.
    Weight-drop on W_hh is applied by the caller (``RNNStack``), identically for fused and scratch layers.
    ``proj_size`` = P > 0 (LSTM only): the LSTMP of the module doc, parameters as ``nn.LSTM(proj_size=P)``.
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
        self.cell, self.hidden_size, self.recurrent_dropout = cell, hidden_size, recurrent_dropout
        self.output_size = proj_size or hidden_size  # the width of h_t
        gh = GATES[cell] * hidden_size
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
        self.norm_c = nn.LayerNorm(hidden_size) if layer_norm and cell == "lstm" else None

    def forward(
        self, x: torch.Tensor, state: torch.Tensor, weight_hh: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, T, I], state [S, B, H] (S = 2 for LSTM: h, C) -> outputs [B, T, P], final state [S, B, H].

        P = H but for the LSTMP, whose h [B, P] fills the first P columns of its state slot (zeros after them).
        ``weight_hh`` replaces W_hh for this call (weight-drop passes the masked matrix)."""
        gis = project_input(self, x).transpose(0, 1)  # [T, B, G*H]: contiguous rows per step below
        h, c = state[0, :, : self.output_size], (state[1] if self.cell == "lstm" else None)  # [B, P], [B, H]
        mask = None
        if self.training and self.recurrent_dropout > 0:  # one mask per sequence, shared by every step
            mask = F.dropout(torch.ones_like(h), self.recurrent_dropout, training=True)
        outs = []
        for gi in gis:
            gh = project_hidden(self, h if mask is None else h * mask, weight_hh)
            h, c = cell_step(self.cell, gi, gh, h, c, self.norm_c, self.weight_hr_l0)
            outs.append(h)
        h = F.pad(h, (0, self.hidden_size - self.output_size))  # [B, H]: the state's width
        new_state = torch.stack((h, c)) if c is not None else h[None]
        return torch.stack(outs, dim=1), new_state
