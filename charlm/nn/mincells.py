"""minGRU and minLSTM (Feng et al. 2024, "Were RNNs All We Needed?"): every gate depends on x_t alone.

Each cell is then the linear recurrence h_t = a_t * h_(t-1) + b_t with a_t, b_t computed from the input only:

    minGRU   z_t = sigmoid(W_z x_t + b_z)           h~_t = g(W_h x_t + b_h)
             h_t = (1 - z_t) * h_(t-1) + z_t * h~_t
    minLSTM  f_t = sigmoid(W_f x_t + b_f)           i_t = sigmoid(W_i x_t + b_i)       h~_t = g(W_h x_t + b_h)
             f'_t = f_t / (f_t + i_t)                i'_t = i_t / (f_t + i_t)
             h_t = f'_t * h_(t-1) + i'_t * h~_t

with g(v) = v + 0.5 for v >= 0, else sigmoid(v): positive, so every h~_t has a logarithm. Training computes all
timesteps at once: the input projection is one matmul, then a parallel scan in log space (Heinsen 2023, see
``parallel_scan``) instead of a Python loop; sampling runs the step, the sequential form, in O(1) per
character. The weights are laid out as the torch layers' input half: ``weight_ih_l0`` [G*H, I] and ``bias_ih_l0``
[G*H] with blocks z|h (G = 2) or f|i|h (G = 3), so ``projections`` and ``Stepper`` serve them as they serve
the other cells. There is no W_hh.

``model.impl`` for these cells: ``parallel`` is the scan (their ``CellSpec.parallel``; ``fused``, the default,
selects it too, as there is no torch kernel for them), and ``scratch`` the same equations stepped through time
in Python, the reference the scan is tested against. Both specs are registered here, beside their equations.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from charlm.nn.cells import CELLS, CellSpec, projections, register_cell

SCAN_CHUNK = 64  # timesteps per log-space scan: bounds its float32 error to that of 64 steps (see parallel_scan)


def g(v: torch.Tensor) -> torch.Tensor:
    """The paper's positive activation for h~: v + 0.5 for v >= 0, else sigmoid(v) (continuous at 0)."""
    return torch.where(v >= 0, v + 0.5, torch.sigmoid(v))


def log_g(v: torch.Tensor) -> torch.Tensor:
    """log g(v), computed without forming g(v): sigmoid(v) underflows where its log does not.

    relu keeps the unused branch finite where v < 0, so no NaN reaches the gradient through ``where``."""
    return torch.where(v >= 0, torch.log(F.relu(v) + 0.5), -F.softplus(-v))


def mingru_step(gi: torch.Tensor, gh: None, state, norm_c=None):
    """One minGRU timestep, the sequential form: gi [N, 2H] = W_ih x_t + b_ih (z|h), h_(t-1) [N, H] -> (h_t,)."""
    (h,) = state
    k, v = gi.chunk(2, -1)
    z = torch.sigmoid(k)
    return (h + z * (g(v) - h),)  # = (1 - z) * h + z * h~


def minlstm_step(gi: torch.Tensor, gh: None, state, norm_c=None):
    """One minLSTM timestep, the sequential form: gi [N, 3H] (f|i|h), h_(t-1) [N, H] -> (h_t,)."""
    (h,) = state
    k_f, k_i, v = gi.chunk(3, -1)
    f, i = torch.sigmoid(k_f), torch.sigmoid(k_i)
    return ((f * h + i * g(v)) / (f + i),)  # = f' * h + i' * h~


def mingru_coefficients(gi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gi [B, T, 2H] -> (log a, log b), each [B, T, H], for h_t = a_t * h_(t-1) + b_t, in log space throughout:
    log(1 - z) = -softplus(k), log z = -softplus(-k)."""
    k, v = gi.chunk(2, -1)
    return -F.softplus(k), -F.softplus(-k) + log_g(v)


def minlstm_coefficients(gi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """gi [B, T, 3H] -> (log a, log b) as ``mingru_coefficients``: with d = log i - log f
    = softplus(-k_f) - softplus(-k_i), log f' = -softplus(d) and log i' = -softplus(-d)."""
    k_f, k_i, v = gi.chunk(3, -1)
    d = F.softplus(-k_f) - F.softplus(-k_i)
    return -F.softplus(d), -F.softplus(-d) + log_g(v)


def scan(coefficients, gi: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """A ``CellSpec.parallel``: all timesteps of a linear-recurrence cell at once, from its ``coefficients``."""
    return parallel_scan(*coefficients(gi), h0)


def parallel_scan(log_a: torch.Tensor, log_b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """h_t = a_t * h_(t-1) + b_t for t = 1..T at once (Heinsen 2023): log_a, log_b [B, T, H], h0 [B, H] -> [B, T, H].

    With a*_t = sum_(s<=t) log a_s, h_t = exp(a*_t) * (h_0 + sum_(s<=t) b_s exp(-a*_s)), whose sum is
    exp(logcumsumexp(log b - a*)). h_0 is the scan's t = 0 term (b_0 = h_0, a*_0 = 0). Heinsen prepends log h_0
    to log b; that needs h_0 > 0, but a carried state may be zero (the first batch) or of any sign (a state given
    by hand), so its term exp(a*_t) * h_0 is added outside the log: the same sum, exact for every h_0.

    Precision: a*_t and the logcumsumexp both grow like t and cancel, so the relative error grows like t * eps:
    about 1e-7 * t in float32, and of order one within some hundred steps in bf16. So this runs in float32 or
    wider, in chunks of ``SCAN_CHUNK`` steps, each chunk's last h carried into the next as its h_0 (exactly, as
    TBPTT carries state across batches): the error stays that of one chunk at any T."""
    outs, h = [], h0
    for start in range(0, log_a.shape[1], SCAN_CHUNK):
        a, b = log_a[:, start : start + SCAN_CHUNK], log_b[:, start : start + SCAN_CHUNK]  # [B, C, H]
        a_star = a.cumsum(1)  # log of the product a_1 ... a_t within the chunk
        out = a_star.exp() * h[:, None] + (a_star + (b - a_star).logcumsumexp(1)).exp()  # [B, C, H]
        outs.append(out)
        h = out[:, -1]
    return torch.cat(outs, dim=1)


class MinLayer(nn.Module):
    """One layer of a cell whose gates read x_t alone (``CellSpec.recurrent=False``: minGRU, minLSTM):
    x [B, T, I], state [1, B, H] -> outputs [B, T, H], final state [1, B, H].

    ``parallel=True`` (``model.impl=parallel``, or ``fused``) runs the cell's ``CellSpec.parallel`` form, ``False``
    (``scratch``) the time loop of its step; both hold the same parameters, so a checkpoint moves between them
    as the other cells' do. Both run in float32 or wider under autocast: the loop is the scan's reference."""

    def __init__(self, cell: str, input_size: int, hidden_size: int, parallel: bool = True, layer_norm: bool = False):
        super().__init__()
        self.spec = CELLS[cell]
        self.cell, self.hidden_size, self.parallel = cell, hidden_size, parallel
        gh = self.spec.blocks * hidden_size
        self.weight_ih_l0 = nn.Parameter(torch.empty(gh, input_size))
        self.bias_ih_l0 = nn.Parameter(torch.empty(gh))
        bound = 1 / math.sqrt(hidden_size)  # nn.RNN's init, as ScratchLayer
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)
        self.norm_ih = nn.LayerNorm(gh) if layer_norm else None  # LN over all of W_ih x, as the LN cells do

    def forward(
        self, x: torch.Tensor, state: torch.Tensor, weight_hh: None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``weight_hh``: always None (there is no W_hh); accepted so that every layer is called alike."""
        ih, _ = projections(self, self.spec)
        gi = ih(x)  # [B, T, G*H]: one matmul, under autocast if the caller runs one
        # The scan in float32 (float64 stays float64) whatever the autocast dtype: in bf16 it is off by tens of
        # percent after 128 steps (see parallel_scan).
        dtype = torch.promote_types(gi.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            gi, h = gi.to(dtype), state[0].to(dtype)  # [B, T, G*H], [B, H]
            if self.parallel:
                out = self.spec.parallel(gi, h)
            else:
                steps = []
                for gi_t in gi.unbind(1):
                    (h,) = self.spec.step(gi_t, None, (h,))
                    steps.append(h)
                out = torch.stack(steps, dim=1)
        return out.to(x.dtype), out[:, -1][None].to(state.dtype)  # [B, T, H], [1, B, H]

    def extra_repr(self) -> str:
        return f"{self.cell}, {self.weight_ih_l0.shape[1]}, {self.hidden_size}, parallel={self.parallel}"


register_cell(
    CellSpec(
        name="mingru",
        blocks=2,  # z|h
        step=mingru_step,
        recurrent=False,
        parallel=partial(scan, mingru_coefficients),
    )
)
register_cell(
    CellSpec(
        name="minlstm",
        blocks=3,  # f|i|h
        step=minlstm_step,
        recurrent=False,
        parallel=partial(scan, minlstm_coefficients),
    )
)
