"""Start a new run from another run's weights (``init_from=PATH``), as nanoGPT's ``init_from`` does.

Unlike ``ckpt_path``, which resumes one run exactly, only the weights come over: the optimiser, the schedule, the
step counter, the data position and the run directory are new, and the corpus may be any. The checkpoint fixes
the architecture (``ARCHITECTURE``; ``architecture_from``); a corpus with characters the checkpoint's vocab lacks
extends it (``CharDataModule(base_vocab=...)``), and ``copy_weights`` gives the new characters fresh rows.
``freeze`` keeps the embedding or the lowest layers as they came.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from charlm import UserError
from charlm.nn.rnn import ARCHITECTURE, RNNStack

FREEZE_EXAMPLE = "freeze=embedding, freeze=layers:1 or freeze=[embedding,layers:1]"


def architecture_from(
    model_cfg: DictConfig, saved: dict, overrides: Iterable[str], path: str, refuse: bool = True
) -> None:
    """Set ``model_cfg``'s architecture to the checkpoint's hyperparameters ``saved``. A setting given on the
    command line (``overrides``; ``model=NAME`` picks model.cell) that differs is refused (or with ``refuse=False``
    kept, for the resume's own check to name); one from a config file (a default, an experiment) gives way."""
    keys = {item.lstrip("+~").partition("=")[0] for item in overrides}
    explicit = {name for name in ARCHITECTURE if f"model.{name}" in keys} | ({"cell"} if "model" in keys else set())
    for name in ARCHITECTURE:
        if name in explicit and model_cfg.get(name) != saved[name]:
            if not refuse:
                continue
            raise UserError(
                f"init_from checkpoint {path!r} has model.{name}={_yaml(saved[name])}; drop"
                f" model.{name}={_yaml(model_cfg.get(name))} (the checkpoint fixes the architecture), or drop"
                " init_from to train a new model."
            )
        model_cfg[name] = saved[name]


def _yaml(value: object) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


@dataclass(frozen=True)
class Freeze:
    """What ``freeze`` keeps from training: the embedding, and the lowest ``layers`` recurrent layers."""

    embedding: bool = False
    layers: int = 0

    def __str__(self) -> str:
        parts = ["embedding"] * self.embedding + [f"layers:{self.layers}"] * bool(self.layers)
        return ",".join(parts) or "none"


def parse_freeze(value: str | Sequence[str] | None) -> Freeze:
    """``freeze``: none (or null), ``embedding``, ``layers:N``, or several of them as a list or joined by commas."""
    items = [] if value is None else value.split(",") if isinstance(value, str) else list(value)
    embedding, layers = False, 0
    for item in (str(i).strip() for i in items):
        kind, _, count = item.partition(":")
        if item in ("none", ""):
            continue
        if item == "embedding":
            embedding = True
        elif kind == "layers" and count.isdigit() and int(count) >= 1:
            layers = int(count)
        else:
            raise UserError(f"freeze={item!r} is not known; use freeze=none, {FREEZE_EXAMPLE}.")
    return Freeze(embedding, layers)


def freeze_parts(net: RNNStack, freeze: Freeze) -> None:
    """Stop gradients to what ``freeze`` names (``CharLM.configure_optimizers`` then leaves those parameters out).
    With tied weights the decoder's matrix is the embedding's, so it is frozen with it."""
    if freeze.embedding:
        if net.embedding is None:
            raise UserError("freeze=embedding, but model.embedding_size=0 feeds one-hot vectors; drop embedding.")
        net.embedding.weight.requires_grad_(False)
    if freeze.layers > net.num_layers:
        raise UserError(
            f"freeze=layers:{freeze.layers} asks for more layers than model.num_layers={net.num_layers};"
            f" use freeze=layers:{net.num_layers} at most."
        )
    for layer in net.layers[: freeze.layers]:
        layer.requires_grad_(False)


@torch.no_grad()
def copy_weights(new: RNNStack, old: RNNStack, new_chars: str = "") -> None:
    """Copy ``old``'s weights into ``new``, built from the same architecture over a vocab that begins with
    ``old``'s. A tensor that grew with the vocab (embedding and decoder rows, the decoder bias, a one-hot input
    layer's columns) gets ``old``'s values in its leading block; the rest of it, for ``new_chars``, keeps ``new``'s
    own fresh init, as a new model's rows have. Tied weights are one tensor, copied once either way."""
    saved = old.state_dict()
    params = dict(new.named_parameters(remove_duplicate=False))
    for name, tensor in new.state_dict().items():
        source = saved[name]
        if source.shape == tensor.shape:
            tensor.copy_(source)
            continue
        if name in params and not params[name].requires_grad:
            raise UserError(
                f"freeze would keep {name} at its random init for the characters new to this corpus"
                f" ({new_chars!r}); train without freeze, or on text without new characters."
            )
        tensor[tuple(slice(0, n) for n in source.shape)].copy_(source)
