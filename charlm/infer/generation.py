"""Stateful, batched, streaming generation: the prompt is read in one pass, then O(1) work per character."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from charlm import UserError
from charlm.checks import number, whole
from charlm.data.vocab import Vocab
from charlm.nn.rnn import RNNStack
from charlm.nn.stepper import Stepper


@dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    """How each next character is drawn: the one home of these settings and their defaults, shared by
    ``generate.py``, the sample printed at the end of training and the TensorBoard sample callback."""

    temperature: float = 0.8  # 0 = greedy (argmax)
    top_k: int = 0  # keep only the k most likely characters (0 = off)
    top_p: float = 1.0  # nucleus sampling: the smallest set with this much probability (1 = off)
    stop: str | None = None  # a sample ends with the first occurrence of this text after the prompt (None = off)

    def __post_init__(self) -> None:
        number("temperature", self.temperature, 0, example=0.8)
        whole("top_k", self.top_k, 0, example="0 (off)")
        number("top_p", self.top_p, 0, 1, low_open=True, example="1 (off)")
        if self.stop is not None and (not isinstance(self.stop, str) or not self.stop):
            raise UserError(f"stop={self.stop!r} must be non-empty text, e.g. stop='\\n\\n'; leave it out for none.")


ESCAPES = {"n": "\n", "t": "\t", "\\": "\\"}


def unescape(text: str) -> str:
    r"""Text as typed on a command line: ``\n`` is a newline, ``\t`` a tab, ``\\`` one backslash; any other
    backslash stays as it is (``C:\dir`` keeps its backslash).

    Hydra passes ``'stop="\n\n"'`` on as a backslash and an ``n`` twice, so without this a stop text typed that
    way never matches. Only ``prompt`` and ``stop`` go through it; ``prompt_file`` is read as it is."""
    return re.sub(r"\\([nt\\])", lambda m: ESCAPES[m.group(1)], text)


def check_length(length: int, num_samples: int) -> None:
    whole("length", length, 0, example=500)
    whole("num_samples", num_samples, 1, example=4)


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
    # Gumbel-max: argmax(logits + G), G = -log(Exp(1)), is an exact draw from softmax(logits), and cheaper per
    # character than torch.multinomial, which matters in the single-stream loop (bench.sampling).
    return (logits - torch.empty_like(logits).exponential_(generator=generator).log()).argmax(-1)


def start_ids(vocab: Vocab, prompt: str, unknown: str = "error") -> list[int]:
    """Prompt ids; an empty prompt starts from a newline (or a space, or id 0), which is not echoed."""
    ids = vocab.encode(prompt, unknown=unknown).tolist()
    for start in ("\n", " "):
        ids = ids or vocab.encode(start, unknown="skip").tolist()
    return ids or [0]


def generate(
    net: RNNStack,
    vocab: Vocab,
    prompt: str = "",
    length: int = 200,
    settings: GenerationConfig = GenerationConfig(),
    *,
    num_samples: int = 1,
    unknown: str = "error",
    generator: torch.Generator | None = None,
    quantize: str = "none",
) -> Iterator[torch.Tensor]:
    """Return an iterator over the ids [num_samples] of each new character, ``length`` of them.

    Arguments and prompt are checked now, before anything is produced. All samples run as one batch. The
    context is never re-fed: the prompt goes through ``net`` once, then each step feeds only the last
    character with the carried state, so every character costs the same. ``net`` should be in eval mode.
    ``quantize="int8"``: the steps after the prompt use weight-only int8 matrices (see ``charlm.nn.stepper``).
    """
    check_length(length, num_samples)
    device = next(net.parameters()).device
    x = torch.tensor(start_ids(vocab, prompt, unknown), device=device).expand(num_samples, -1)  # [N, P]
    step = Stepper(net, quantize)  # built now, so that a bad quantize is refused now; then one character at a time
    return _steps(net, step, x, length, settings, generator)


def _steps(
    net: RNNStack,
    step: Stepper,
    x: torch.Tensor,
    length: int,
    settings: GenerationConfig,
    generator: torch.Generator | None,
) -> Iterator[torch.Tensor]:
    with torch.inference_mode():
        logits, state = net(x)  # the whole prompt in one pass: [N, P, V]
        layers = step.split(state)
        logits = logits[:, -1]
    for i in range(length):
        with torch.inference_mode():
            ids = next_token(logits, settings.temperature, settings.top_k, settings.top_p, generator)  # [N]
            if i + 1 < length:
                logits, layers = step.advance(ids, layers)  # [N, V]
        yield ids


def stream_text(
    net: RNNStack,
    vocab: Vocab,
    prompt: str = "",
    length: int = 200,
    settings: GenerationConfig = GenerationConfig(),
    **options,
) -> Iterator[list[str]]:
    """Decoded text as it is produced, one string per sample: first the prompt, then each new character.

    ``options``: ``generate``'s keyword arguments (``num_samples``, ``unknown``, ``generator``, ``quantize``).
    Checks everything before the first yield, as ``generate`` does; ``"".join`` of a sample's pieces is
    the sample. With ``data.unit=byte`` a step's piece is "" until the bytes of a character are complete (and
    U+FFFD for bytes that form none); the last yield then flushes a character cut by the end. With
    ``settings.stop``, a sample ends with (and includes) the first occurrence of the stop text that generated
    text completes; it yields "" from then on, and generation ends once every sample has stopped (or after
    ``length`` tokens)."""
    steps = generate(net, vocab, prompt, length, settings, **options)
    num_samples = options.get("num_samples", 1)
    yield [prompt] * num_samples
    decode, stop = vocab.stream_decoder(num_samples), settings.stop
    keep = len(stop or "") - 1  # a stop text may begin in the prompt or earlier text: carry that much
    tails = [prompt[len(prompt) - keep :] if keep > 0 else ""] * num_samples
    running = [True] * num_samples
    for ids in steps:
        pieces = decode(ids.cpu())
        if stop:
            pieces = _until_stop(pieces, stop, tails, running)
        yield pieces
        if not any(running):
            steps.close()  # no more steps are computed
            return
    if any(rest := [piece if on else "" for piece, on in zip(decode.flush(), running, strict=True)]):
        yield rest


def _until_stop(pieces: list[str], stop: str, tails: list[str], running: list[bool]) -> list[str]:
    """Each running sample's piece, cut just after the stop text if it completes it; updates ``tails`` (the last
    len(stop) - 1 characters of each sample) and ``running`` in place."""
    keep = len(stop) - 1
    for i, piece in enumerate(pieces):
        if not running[i]:
            pieces[i] = ""
            continue
        tail = tails[i] + piece
        end = tail.find(stop)
        if end >= 0:  # the tail before this piece held no stop text, so it ends inside the piece
            running[i] = False
            pieces[i] = piece[: len(piece) - (len(tail) - end - len(stop))]
        tails[i] = tail[len(tail) - keep :] if keep else ""
    return pieces


def sample_text(*args, **kwargs) -> list[str]:
    """Whole samples as strings, each starting with the prompt; the arguments are those of ``stream_text``."""
    pieces = list(stream_text(*args, **kwargs))
    return ["".join(chunks) for chunks in zip(*pieces, strict=True)]
