"""RNNStack: embedding -> dropout -> L recurrent layers (dropout between) -> dropout -> decoder.

Zaremba, Sutskever & Vinyals (2014): dropout only on the non-recurrent connections. Each layer is a
fused single-layer torch RNN (cuDNN / oneDNN), so h(t-1) -> h(t) runs inside the kernel and no dropout
can reach it; the ``nn.Dropout`` modules below are the only places where units are dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from charlm import UserError

CELLS = {
    "lstm": (nn.LSTM, {}),
    "gru": (nn.GRU, {}),
    "rnn_tanh": (nn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (nn.RNN, {"nonlinearity": "relu"}),
}

# The recurrent state of the whole stack is one tensor [S, L, B, H]: S = 2 (h, c) for LSTM, else 1 (h).
# One shape for every cell keeps carrying, detaching and resetting state a one-liner.
State = torch.Tensor


def check_hparams(
    vocab_size: int,
    cell: str,
    num_layers: int,
    hidden_size: int,
    embedding_size: int | None,
    dropout: float,
    tie_weights: bool,
    init_scale: float | None,
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
    if not 0 <= dropout < 1:
        raise UserError(f"model.dropout={dropout} must be in [0, 1); e.g. model.dropout=0.2.")
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
    ):
        super().__init__()
        check_hparams(vocab_size, cell, num_layers, hidden_size, embedding_size, dropout, tie_weights, init_scale)
        self.vocab_size, self.cell, self.num_layers, self.hidden_size = vocab_size, cell, num_layers, hidden_size
        emb = hidden_size if embedding_size is None else embedding_size
        self.embedding = nn.Embedding(vocab_size, emb) if emb else None
        in_size = emb or vocab_size
        rnn_cls, kwargs = CELLS[cell]
        self.layers = nn.ModuleList(
            rnn_cls(in_size if k == 0 else hidden_size, hidden_size, batch_first=True, **kwargs)
            for k in range(num_layers)
        )
        self.drop = nn.Dropout(dropout)  # stateless, so one module serves every non-recurrent connection
        self.decoder = nn.Linear(hidden_size, vocab_size)
        if init_scale is not None:
            for p in self.parameters():
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
            layer_state = (state[0, k : k + 1], state[1, k : k + 1]) if self.cell == "lstm" else state[0, k : k + 1]
            h, layer_state = layer(h, layer_state)  # [B, T, H]; the recurrence h(t-1)->h(t) is inside the kernel
            new_state.append(torch.cat(layer_state) if self.cell == "lstm" else layer_state)  # [S, B, H]
        logits = self.decoder(self.drop(h))  # [B, T, V]
        return logits, torch.stack(new_state, dim=1)  # [S, L, B, H]
