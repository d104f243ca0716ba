"""Stateful, batched, streaming generation: the prompt is read in one pass, then O(1) work per character."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from charlm import UserError
from charlm.model import RNNStack
from charlm.vocab import CharVocab


def check_sampling(length: int, temperature: float, top_k: int, top_p: float, num_samples: int) -> None:
    if length < 0:
        raise UserError(f"length={length} must be >= 0; e.g. length=500.")
    if temperature < 0:
        raise UserError(f"temperature={temperature} must be >= 0 (0 is greedy); e.g. temperature=0.8.")
    if top_k < 0:
        raise UserError(f"top_k={top_k} must be >= 0 (0 disables it).")
    if not 0 < top_p <= 1:
        raise UserError(f"top_p={top_p} must be in (0, 1] (1 disables it).")
    if num_samples < 1:
        raise UserError(f"num_samples={num_samples} must be at least 1.")


def next_token(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """logits [N, V] -> ids [N]: greedy at temperature 0, else sampled after top-k and nucleus (top-p) filtering."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # [N, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= top_p  # mass before this token already reaches top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    # Gumbel-max: argmax(logits + G), G = -log(Exp(1)), is an exact draw from softmax(logits); half the cost of
    # torch.multinomial per character, which matters in the single-stream loop.
    return (logits - torch.empty_like(logits).exponential_(generator=generator).log()).argmax(-1)


def start_ids(vocab: CharVocab, prompt: str, unknown: str = "error") -> list[int]:
    """Prompt ids; an empty prompt starts from a newline (or space, or the first char), which is not echoed."""
    ids = vocab.encode(prompt, unknown=unknown).tolist()
    if ids:
        return ids
    for c in ("\n", " ", vocab.chars[0]):
        if c in vocab.chars:
            return [vocab.chars.index(c)]


def generate(
    net: RNNStack,
    vocab: CharVocab,
    prompt: str = "",
    length: int = 200,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    num_samples: int = 1,
    unknown: str = "error",
    generator: torch.Generator | None = None,
) -> Iterator[torch.Tensor]:
    """Return an iterator over the ids [num_samples] of each new character, ``length`` of them.

    Arguments and prompt are checked now, before anything is produced. All samples run as one batch. The
    context is never re-fed: the prompt goes through ``net`` once, then each step feeds only the last
    character with the carried state, so every character costs the same. ``net`` should be in eval mode.
    """
    check_sampling(length, temperature, top_k, top_p, num_samples)
    device = next(net.parameters()).device
    x = torch.tensor(start_ids(vocab, prompt, unknown), device=device).expand(num_samples, -1)  # [N, P]
    return _steps(net, x, length, temperature, top_k, top_p, generator)


def _steps(
    net: RNNStack,
    x: torch.Tensor,
    length: int,
    temperature: float,
    top_k: int,
    top_p: float,
    generator: torch.Generator | None,
) -> Iterator[torch.Tensor]:
    with torch.inference_mode():
        logits, state = net(x)  # the whole prompt in one pass: [N, P, V]
        step = net.stepper()  # then one character at a time through the cell equations
        layers = step.split(state)
        logits = logits[:, -1]
    for i in range(length):
        with torch.inference_mode():
            ids = next_token(logits, temperature, top_k, top_p, generator)  # [N]
            if i + 1 < length:
                logits, layers = step.advance(ids, layers)  # [N, V]
        yield ids


def sample_text(net: RNNStack, vocab: CharVocab, prompt: str = "", length: int = 200, **kwargs) -> list[str]:
    """Whole samples as strings, each starting with the prompt."""
    steps = list(generate(net, vocab, prompt, length, **kwargs))
    if not steps:
        return [prompt] * kwargs.get("num_samples", 1)
    ids = torch.stack(steps, dim=1).cpu()  # [N, length]
    return [prompt + vocab.decode(row) for row in ids]
