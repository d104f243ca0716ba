"""Beam search on the stepped state: the K likeliest continuations found so far, each with its recurrent state,
advanced one character at a time; reordering the beams reorders their states, so no prefix is ever re-fed."""

from __future__ import annotations

from typing import NamedTuple

import torch

from charlm import UserError
from charlm.checks import number, whole
from charlm.data.vocab import Vocab
from charlm.infer.generation import check_length, start_ids
from charlm.nn.rnn import RNNStack
from charlm.nn.stepper import Stepper


class Beam(NamedTuple):
    completion: str  # the text after the prompt (the stop text included, if it ended the beam)
    ids: list[int]  # its token ids
    logprob: float  # log p(completion | prompt), natural log: what charlm.score gives for it
    score: float  # logprob / len(ids) ** length_penalty: what the beams are ranked by
    stopped: bool  # whether the stop text ended it


def check_beam(beam: int, num_samples: int, length_penalty: float) -> None:
    whole("beam", beam, 1, example=4)
    number("length_penalty", length_penalty, example="0 (off) or 1 (per-character mean)")
    if num_samples > beam:
        raise UserError(f"num_samples={num_samples} but beam={beam} keeps only {beam}; pass num_samples <= beam.")


def penalised(logprob: float, length: int, alpha: float) -> float:
    """A beam's score, ``logprob / length ** alpha`` (as Hugging Face's ``length_penalty``; not GNMT's
    ((5 + length) / 6) ** alpha). 0: the log-probability itself; 1: its mean per character, so that a beam which
    ``stop`` ends early is not preferred just for being short."""
    return logprob / max(length, 1) ** alpha


def beam_search(
    net: RNNStack,
    vocab: Vocab,
    prompt: str = "",
    length: int = 200,
    beam: int = 4,
    *,
    num_samples: int = 1,
    stop: str | None = None,
    length_penalty: float = 0.0,
    unknown: str = "error",
    quantize: str = "none",
) -> list[Beam]:
    """The ``num_samples`` best of ``beam`` beams after ``length`` characters (or ``stop``), best first.

    Each step extends every live beam by every token and keeps the ``beam`` best sums of log-probabilities; a
    candidate that completes ``stop`` (which may begin in the prompt) is set aside as finished instead, if it
    ranks among the ``beam`` best. The search ends when no live beam can beat the ``beam``-th finished one any
    more (log-probabilities only fall), or after ``length`` characters. ``beam=1`` is greedy decoding.
    ``net`` should be in eval mode."""
    check_length(length, num_samples)
    check_beam(beam, num_samples, length_penalty)
    device = next(net.parameters()).device
    step = Stepper(net, quantize)
    context = vocab.encode(prompt, unknown=unknown).tolist()
    stop_ids = _stop_ids(vocab, stop)
    if length == 0:
        return [Beam("", [], 0.0, 0.0, False)] * num_samples
    finished: list[Beam] = []
    with torch.inference_mode():
        logits, state = net(torch.tensor(start_ids(vocab, prompt, unknown), device=device)[None])  # [1, P, V]
        layers = step.split(state)
        logp = torch.log_softmax(logits[:, -1].float(), -1)  # [k, V] for the k live beams
        scores = torch.zeros(1, dtype=torch.float64, device=device)  # [k] their sums of log-probabilities
        seqs: list[list[int]] = [[]]
        for t in range(1, length + 1):
            total = (scores[:, None] + logp).flatten()  # [k * V]
            best, where = total.topk(min(2 * beam, len(total)))  # enough to fill `beam` live ones after stops
            rows, tokens, kept = [], [], []
            for rank, (s, i) in enumerate(zip(best.tolist(), where.tolist(), strict=True)):
                row, token = divmod(i, logp.shape[1])
                seq = seqs[row] + [token]
                if stop_ids and (context + seq)[-len(stop_ids) :] == stop_ids:
                    if rank < beam:
                        finished.append(Beam(vocab.decode(seq), seq, s, penalised(s, t, length_penalty), True))
                    continue
                rows.append(row)
                tokens.append(token)
                kept.append(s)
                if len(rows) == beam:
                    break
            finished = sorted(finished, key=lambda b: -b.score)[:beam]
            if not rows:  # every candidate completed the stop text
                seqs = []
                break
            index = torch.tensor(rows, device=device)
            layers = [tuple(s.index_select(0, index) for s in layer) for layer in layers]  # each beam's own state
            seqs = [seqs[r] + [token] for r, token in zip(rows, tokens, strict=True)]
            scores = torch.tensor(kept, dtype=torch.float64, device=device)
            if len(finished) == beam and finished[-1].score >= _bound(kept[0], t, length, length_penalty):
                seqs = []
                break
            if t < length:
                logits, layers = step.advance(torch.tensor(tokens, device=device), layers)
                logp = torch.log_softmax(logits.float(), -1)
    live = [
        Beam(vocab.decode(seq), seq, s, penalised(s, len(seq), length_penalty), False)
        for seq, s in zip(seqs, scores.tolist(), strict=False)
    ]
    return sorted(finished + live, key=lambda b: -b.score)[:num_samples]


def _bound(logprob: float, t: int, length: int, alpha: float) -> float:
    """The best score a live beam with ``logprob`` after ``t`` characters can still reach: its log-probability
    only falls, and the penalty's divisor is largest at ``t + 1`` or at ``length`` characters."""
    if t >= length:
        return penalised(logprob, t, alpha)
    return logprob / max(max(t + 1, 1) ** alpha, length**alpha)


def _stop_ids(vocab: Vocab, stop: str | None) -> list[int]:
    """``stop`` as ids; [] when there is none, or when it holds a character outside the vocab (it cannot occur)."""
    if not stop:
        return []
    ids = vocab.encode(stop, unknown="skip").tolist()
    return ids if vocab.unit == "byte" or len(ids) == len(stop) else []
