"""Stepper: one token per stream through the cell equations, the inner loop of generation; exact (float32) or,
opt-in, with weight-only int8 matrices."""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from charlm import UserError
from charlm.nn.cells import projections
from charlm.nn.rnn import RNNStack, State

Quantize = Literal["none", "int8"]  # exact float32 steps | weight-only int8 matrices


class Affine:
    """``x [N, in] -> x W^T + b [N, out]`` (then the layer norm, if any) for a few rows at a time.

    float32: a copy of W as stored, [out, in] row-major, each call one ``addmm`` on its transposed view, so that
    each thread reads its rows of W as one contiguous stream (the matrices of a mid-sized model outgrow the L2
    caches and are streamed from L3 at every step). int8 (weight-only, per output row): W as int8 with one scale
    per row, and ``torch._weight_int8pack_mm`` on bf16 activations: a quarter of the bytes, so more of the
    matrices stay in the L2 caches. Per-row scales are bf16, as that kernel wants them, so each row carries a
    rounding of at most 2^-9 on top of int8's.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor,
        norm: Callable[[torch.Tensor], torch.Tensor] | None,
        quantize: str = "none",
    ):
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


class StepLayer(NamedTuple):
    """What ``Stepper.advance`` needs of one layer, gate rows in the order the cell's step reads them."""

    ih: Affine | None  # W_ih x + b_ih; None for layer 0 (the table) and for summed layers
    hh: Affine | None  # W_hh h + b_hh (summed layer 0: its bias is the table row); None without W_hh
    joint: Affine | None  # summed layers above 0: [W_ih | W_hh] [x, h] + b_ih + b_hh in one product
    norm_c: nn.Module | None  # the layer norm of C, if the layer has one
    weight_hr: torch.Tensor | None  # the LSTMP's W_hr [P, H], if the layer has one


class Stepper:
    """One character per stream for inference: ``stepper(ids [N], state [S, L, N, H]) -> logits [N, V], state``.

    Runs the step equations of the net's cell (``CellSpec.step``) on the weights of any ``RNNStack``, fused,
    parallel or scratch: a length-1 call of a fused kernel or a scan costs far more on CPU than these few small
    products. Built once per generation, because it precomputes:
    - layer 0's input projection of every token, W_ih e_v + b_ih: a row lookup replaces a matmul;
    - every other matrix as an ``Affine``: float32 in its stored layout, or with ``quantize="int8"``
      weight-only int8 (approximate: the logits move; bench.sampling measures what it costs in bits);
    - where the step needs only the sum W_ih x + W_hh h (``CellSpec.summed``, without layer norm): b_hh folded
      into layer 0's table, and one matrix [W_ih | W_hh] on [x, h] above it: fewer, larger products per step;
    - the gate rows in the order the step reads them (``CellSpec.order``), so no step reorders anything.
    It never drops anything, and it sees weight updates only when rebuilt. An LSTMP's h is P < H wide: ``split``
    reads it from the first P columns of its state slot, and ``__call__`` writes it back there, zeros after.
    """

    @torch.no_grad()
    def __init__(self, net: RNNStack, quantize: str = "none"):
        if quantize not in typing.get_args(Quantize):
            raise UserError(f"quantize={quantize!r} is not known; use quantize=none (exact) or quantize=int8.")
        self.spec, first = net.spec, net.layers[0]
        self.hidden_size, self.output_size = net.hidden_size, net.cfg.output_size  # H; P (= H but for LSTMP)
        tokens = net.embedding.weight if net.embedding is not None else torch.eye(net.vocab_size).to(first.bias_ih_l0)
        ih, hh = projections(first, self.spec)
        self.table = ih(tokens)  # [V, G*H]
        self.summed = self.spec.summed and not net.cfg.layer_norm
        if self.summed:
            self.table = self.table + hh.bias

        def affine(weight: torch.Tensor, bias: torch.Tensor, norm=None) -> Affine:
            return Affine(weight, bias, norm, quantize)

        self.layers = [self._layer(k, layer, affine) for k, layer in enumerate(net.layers)]
        self.decoder = affine(net.decoder.weight, net.decoder.bias)

    def _layer(self, k: int, layer: nn.Module, affine) -> StepLayer:
        """Layer ``k``'s products for ``advance``; layer 0's W_ih is the table."""
        ih, hh = projections(layer, self.spec)
        own = (getattr(layer, "norm_c", None), getattr(layer, "weight_hr_l0", None))
        if self.summed and k == 0:
            return StepLayer(None, affine(hh.weight, hh.bias), None, *own)
        if self.summed:
            joint = affine(torch.cat([ih.weight, hh.weight], 1), ih.bias + hh.bias)  # [G*H, I + P]
            return StepLayer(None, None, joint, *own)
        return StepLayer(affine(*ih) if k else None, None if hh is None else affine(*hh), None, *own)

    def split(self, state: State) -> list[tuple[torch.Tensor, ...]]:
        """State [S, L, N, H] -> per layer (h [N, P], then the other slots [N, H]), the form ``advance`` carries."""
        p = self.output_size
        return [(state[0, k, :, :p], *state[1:, k]) for k in range(len(self.layers))]

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, state: State) -> tuple[torch.Tensor, State]:
        logits, layers = self.advance(ids, self.split(state))
        pad = (0, self.hidden_size - self.output_size)  # h [N, P] -> [N, H]
        slots = [torch.stack((F.pad(h, pad) if pad[1] else h, *rest)) for h, *rest in layers]  # [S, N, H] each
        return logits, torch.stack(slots, dim=1)

    def advance(
        self, ids: torch.Tensor, layers: list[tuple[torch.Tensor, ...]]
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, ...]]]:
        """``__call__`` on the per-layer list of ``split``, which saves the stacking in a sampling loop."""
        x, new = ids, []
        for k, (state, layer) in enumerate(zip(layers, self.layers, strict=True)):
            h = state[0]
            if self.summed:  # the gates' pre-activations, both projections and both biases in one tensor
                gi, gh = (layer.hh(h, self.table[x]) if k == 0 else layer.joint(torch.cat([x, h], 1))), None
            else:
                gi = self.table[x] if k == 0 else layer.ih(x)
                gh = None if layer.hh is None else layer.hh(h)
            h, *rest = self.spec.step(gi, gh, state, layer.norm_c)
            if layer.weight_hr is not None:
                h = F.linear(h, layer.weight_hr)  # [N, P]
            x = h
            new.append((h, *rest))
        return self.decoder(x), new
