"""Stepper: one token per stream through the cell equations, the inner loop of generation; exact (float32) or,
opt-in, with weight-only int8 matrices."""

from __future__ import annotations

import torch
from torch import nn

from charlm import UserError
from charlm.cells import cell_step, project_input
from charlm.mincells import MIN_GATES, min_step
from charlm.model import RNNStack, State

QUANTIZE = ("none", "int8")


def ifog(hidden_size: int) -> torch.Tensor:
    """Indices that reorder LSTM gate rows from nn.LSTM's i|f|g|o to i|f|o|g."""
    h = hidden_size
    return torch.cat([torch.arange(2 * h), torch.arange(3 * h, 4 * h), torch.arange(2 * h, 3 * h)])


def lstm_ifog(
    gates: torch.Tensor, c: torch.Tensor, weight_hr: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``charlm.cells.lstm_cell`` on pre-activations in i|f|o|g order, in fewer ops for the one-step loop: one
    sigmoid for the three gates, C_t = f * C + i * C~ as one fused multiply-add."""
    sig, g = gates.split([3 * c.shape[-1], c.shape[-1]], -1)
    i, f, o = torch.sigmoid(sig).chunk(3, -1)
    c = torch.addcmul(f * c, i, torch.tanh(g))
    h = o * torch.tanh(c)
    return (h if weight_hr is None else torch.nn.functional.linear(h, weight_hr)), c


class Affine:
    """``x [N, in] -> x W^T + b [N, out]`` (then the layer norm, if any) for a few rows at a time.

    float32: a copy of W as stored, [out, in] row-major, each call one ``addmm`` on its transposed view: MKL then
    reads each thread's rows as one contiguous stream. For one stream of a 2x512 LSTM (12 MB of matrices, more
    than the L2 caches hold, so read from L3 every step) the step's three products took 270 us against 291 us
    from a transposed copy, and a whole step 374-381 us against 402-417 (2026-12-04, A/B on 2 idle cores); the
    whole sampling loop's gain is within that machine's run-to-run noise. int8 (weight-only, per output row):
    W as int8 with one scale per row, and ``torch._weight_int8pack_mm`` on bf16 activations: a quarter of the
    bytes, so the matrices of a 2x512 LSTM (3 MB instead of 12) stay in the CPU's L2 caches. Per-row scales
    are bf16, as that kernel wants them, so each row carries a rounding of at most 2^-9 on top of int8's.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, norm: nn.Module | None, quantize: str = "none"):
        self.bias, self.norm, self.int8 = bias, norm, quantize == "int8"
        if self.int8:
            scale = weight.abs().amax(1).clamp_min(1e-12) / 127  # [out]
            self.weight = (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous()  # [out, in]
            self.scale = scale.to(torch.bfloat16)
        else:
            # a copy of W [out, in], kept as its transposed view [in, out]: made once, not per step
            self.weight = weight.detach().clone(memory_format=torch.contiguous_format).t()

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``bias``: rows [N, out] to add instead of the layer's own bias."""
        bias = self.bias if bias is None else bias
        if self.int8:
            y = torch._weight_int8pack_mm(x.to(torch.bfloat16), self.weight, self.scale) + bias  # bf16 + fp32: fp32
        else:
            y = torch.addmm(bias, x, self.weight)
        return y if self.norm is None else self.norm(y)


class Stepper:
    """One character per stream for inference: ``stepper(ids [N], state [S, L, N, H]) -> logits [N, V], state``.

    Runs the cell equations of ``charlm.cells`` (the sequential form of ``charlm.mincells`` for minGRU and
    minLSTM) on the weights of a fused or scratch ``RNNStack``; a length-1 call of a fused kernel costs ~10x more
    on CPU. Built once per generation, because it precomputes:
    - layer 0's input projection of every token, W_ih e_v + b_ih: a row lookup replaces a matmul;
    - every other matrix as an ``Affine``: float32 in its stored layout, or with ``quantize="int8"``
      weight-only int8 (approximate: the logits move; bench.sampling measures what it costs in bits);
    - where a cell only needs the sum W_ih x + W_hh h (LSTM and vanilla RNN without layer norm): b_hh folded
      into layer 0's table, and one matrix [W_ih | W_hh] on [x, h] above it: fewer, larger products per step;
      an LSTM's gate rows reordered to i|f|o|g, so its step is six elementwise ops (``lstm_ifog``) instead of nine.
    It never drops anything, and it sees weight updates only when rebuilt. An LSTMP's h is P < H wide: ``split``
    reads it from the first P columns of its state slot, and ``__call__`` writes it back there, zeros after.
    """

    @torch.no_grad()
    def __init__(self, net: RNNStack, quantize: str = "none"):
        if quantize not in QUANTIZE:
            raise UserError(f"quantize={quantize!r} is not known; use quantize=none (exact) or quantize=int8.")
        self.cell, first = net.cell, net.layers[0]
        self.hidden_size, self.output_size = net.hidden_size, net.cfg.output_size  # H; P (= H but for LSTMP)
        tokens = net.embedding.weight if net.embedding is not None else torch.eye(net.vocab_size).to(first.bias_ih_l0)
        self.table = project_input(first, tokens)  # [V, G*H]
        self.summed = net.cell in ("lstm", "rnn_tanh", "rnn_relu") and not net.cfg.layer_norm
        # the summed LSTM's gate rows go i|f|o|g (nn.LSTM's are i|f|g|o): one sigmoid covers three gates
        self.order = ifog(self.hidden_size) if self.summed and self.cell == "lstm" else slice(None)
        if self.summed:
            self.table = (self.table + first.bias_hh_l0)[:, self.order]

        def affine(weight: torch.Tensor, bias: torch.Tensor, norm: nn.Module | None = None) -> Affine:
            return Affine(weight, bias, norm, quantize)

        self.layers = [self._layer(k, layer, affine) for k, layer in enumerate(net.layers)]
        self.decoder = affine(net.decoder.weight, net.decoder.bias)

    def _layer(self, k: int, layer: nn.Module, affine) -> tuple:
        """(W_ih x + b_ih, W_hh h + b_hh, norm of C, W_hr, [W_ih | W_hh] [x, h] + b_ih + b_hh): what ``advance``
        needs of layer ``k``, the others None. Layer 0's W_ih is the table; the min cells have no W_hh."""
        if self.summed:
            rows = self.order
            if k == 0:
                return (
                    None,
                    affine(layer.weight_hh_l0[rows], layer.bias_hh_l0[rows]),
                    None,
                    getattr(layer, "weight_hr_l0", None),
                    None,
                )
            weight = torch.cat([layer.weight_ih_l0, layer.weight_hh_l0], 1)[rows]  # [G*H, I + P]
            joint = affine(weight, (layer.bias_ih_l0 + layer.bias_hh_l0)[rows])
            return None, None, None, getattr(layer, "weight_hr_l0", None), joint
        proj_in = affine(layer.weight_ih_l0, layer.bias_ih_l0, getattr(layer, "norm_ih", None)) if k else None
        proj_hh = (
            None
            if self.cell in MIN_GATES
            else affine(layer.weight_hh_l0, layer.bias_hh_l0, getattr(layer, "norm_hh", None))
        )
        return proj_in, proj_hh, getattr(layer, "norm_c", None), getattr(layer, "weight_hr_l0", None), None

    def split(self, state: State) -> list[tuple]:
        """State [S, L, N, H] -> per layer (h [N, P], C [N, H] or None), the form ``advance`` carries."""
        p, lstm = self.output_size, self.cell == "lstm"
        return [(state[0, k, :, :p], state[1, k] if lstm else None) for k in range(len(self.layers))]

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        logits, layers = self.advance(ids, self.split(state))
        pad = (0, self.hidden_size - self.output_size)  # h [N, P] -> [N, H]
        slots = [(nn.functional.pad(h, pad) if pad[1] else h, c) for h, c in layers]
        return logits, torch.stack([torch.stack(hc) if hc[1] is not None else hc[0][None] for hc in slots], dim=1)

    def advance(self, ids: torch.Tensor, layers: list[tuple]) -> tuple[torch.Tensor, list[tuple]]:
        """``__call__`` on a per-layer list of (h, C or None), which saves the stacking in a sampling loop."""
        x, new = ids, []
        for k, ((h, c), (proj_in, proj_hh, norm_c, weight_hr, joint)) in enumerate(
            zip(layers, self.layers, strict=True)
        ):
            if self.summed:  # the gates' pre-activations, both projections and both biases in one tensor
                gates = proj_hh(h, self.table[x]) if k == 0 else joint(torch.cat([x, h], 1))
                if self.cell == "lstm":
                    x, c = lstm_ifog(gates, c, weight_hr)
                else:
                    x, c = cell_step(self.cell, gates, None, h, c, norm_c, weight_hr)
            elif self.cell in MIN_GATES:  # O(1) per character, as any cell
                x, c = min_step(self.cell, self.table[x] if k == 0 else proj_in(x), h), None
            else:
                x, c = cell_step(
                    self.cell, self.table[x] if k == 0 else proj_in(x), proj_hh(h), h, c, norm_c, weight_hr
                )
            new.append((x, c))
        return self.decoder(x), new
