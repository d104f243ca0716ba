"""Score a text under a checkpoint: ``charlm-score`` (``python -m charlm.score``) and ``score()``.

The text's log-probability, one character at a time, read and scored a chunk at a time with the recurrent state
carried, so a text of any size scores in constant memory. The first character is conditioned on ``prompt`` when
there is one, else on a newline: what ``generate.py`` starts from, so ``score(text, prompt=P)`` is the
log-probability that ``generate.py prompt=P`` writes ``text``. ``streams=B`` cuts the text into B contiguous parts
scored as one batch: part b > 0 starts from a zero state, conditioned only on the character before it (as the
TBPTT evaluation streams of ``CharDataModule`` do), which costs a few nats per part against ``streams=1``.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple, TextIO

import hydra
import numpy as np
import torch
from omegaconf import DictConfig

from charlm import UserError, reported_user_errors
from charlm.checks import choice, whole
from charlm.config import CONF_DIR, register
from charlm.data.chunks import ChunkedText
from charlm.data.vocab import Unknown, Vocab
from charlm.infer.generation import start_ids, unescape
from charlm.infer.options import CHUNK, ScoreOptions
from charlm.nn.rnn import RNNStack, State
from charlm.overrides import check_overrides, hydra_errors_reported
from charlm.training.module import load_checkpoint


@dataclass(frozen=True)
class ScoreResult:
    """Totals of a scored text; ``unit`` and ``bits`` name its tokens and metric as the vocab does (char, bpc |
    byte, bpb)."""

    nats: float  # -log p(text | its start), natural log
    tokens: int  # characters scored (bytes for a byte vocab)
    unknown: int  # characters outside the vocab, which ``unknown_policy`` mapped to unk or left out
    unknown_policy: str
    streams: int
    unit: str = "char"
    bits: str = "bpc"

    @property
    def bits_per_token(self) -> float:
        return self.nats / self.tokens / math.log(2)

    @property
    def ppl(self) -> float:
        return math.exp(self.nats / self.tokens)

    def summary(self) -> dict[str, float | int | str]:
        return {
            f"{self.unit}s": self.tokens,
            "nats": self.nats,
            f"nats_per_{self.unit}": self.nats / self.tokens,
            self.bits: self.bits_per_token,
            "ppl": self.ppl,
            "unknown": self.unknown,
            "unknown_policy": self.unknown_policy,
            "streams": self.streams,
        }


class Scored(NamedTuple):
    """One chunk of one stream, in text order within the stream: what ``score``'s ``each`` receives."""

    stream: int
    ids: torch.Tensor  # [T] the scored tokens
    logprob: torch.Tensor  # [T] the natural log-probability of each
    rank: torch.Tensor  # [T] 1: the model's likeliest token
    top_ids: torch.Tensor  # [T, K] the K likeliest tokens (K = score's ``top``)
    top_logprob: torch.Tensor  # [T, K] their log-probabilities


def score(
    net: RNNStack,
    vocab: Vocab,
    text: str | BinaryIO,
    *,
    prompt: str = "",
    streams: int = 1,
    unknown: str = "error",
    chunk: int = CHUNK,
    top: int = 0,
    each: Callable[[Scored], None] | None = None,
) -> ScoreResult:
    """Score ``text`` (a string, or a binary file of UTF-8 text read ``chunk`` bytes at a time) with ``net`` in
    eval mode; ``each`` receives every chunk's per-token log-probabilities, ranks and ``top`` alternatives.

    A seekable file is read twice: once to check and count it, so that bad input is refused before any
    output, then to score it. A non-seekable one (stdin) is scored as it comes, or, with ``streams > 1``,
    copied to a temporary file first. The last stream also takes the tokens that do not split evenly."""
    choice("unknown", unknown, Unknown)
    whole("streams", streams, 1, example=8)
    whole("chunk", chunk, 1, example=CHUNK)
    whole("top", top, 0, example=5)
    file = io.BytesIO(text.encode("utf-8")) if isinstance(text, str) else text
    context = start_ids(vocab, prompt, unknown)  # [P]: stream 0 starts after the prompt's last character
    with ExitStack() as stack:
        if streams > 1 and not file.seekable():  # read from B places at once: a copy on disk, not in memory
            spool = stack.enter_context(tempfile.TemporaryFile())
            shutil.copyfileobj(file, spool)
            file = spool
        reader = ChunkedText(file, vocab, unknown, chunk)
        nats, tokens, missing = _score(net, reader, context, streams, top, each)
    if tokens == 0:
        raise UserError(f"the text holds no {vocab.unit}s to score (with unknown={unknown}); pass some text.")
    return ScoreResult(nats, tokens, missing, unknown, streams, vocab.unit, vocab.bits)


def _score(
    net: RNNStack,
    reader: ChunkedText,
    context: list[int],
    streams: int,
    top: int,
    each: Callable[[Scored], None] | None,
) -> tuple[float, int, int]:
    """(nats, tokens, characters outside the vocab) of the text ``reader`` reads, after ``context``."""
    tokens = missing = None
    if reader.seekable:
        tokens, missing = reader.count()
        if 0 < tokens < streams:
            unit = reader.vocab.unit
            raise UserError(f"streams={streams} but the text has {tokens} {unit}s; lower streams.")
    chunk = reader.chunk
    part = 0 if streams == 1 or not tokens else tokens // streams  # per stream; the last one reads on to the end
    cursors = [reader.cursor(max(0, b * part - 1)) for b in range(streams)]  # stream b > 0: its previous token
    device = next(net.parameters()).device
    with torch.inference_mode():
        state = net.init_state(streams, device)
        prompt_ids = torch.tensor(context, device=device)
        if len(context) > 1:
            state[:, :, :1] = net(prompt_ids[None, :-1])[1]
        first = [torch.from_numpy(c.take(1)).to(device) for c in cursors[1:]]
        pending = torch.cat([prompt_ids[-1:], *first])  # [B] the input before each stream's next token
        nats, done, tail = 0.0, 0, 0
        while done < part:  # every stream at once
            width = min(max(1, chunk // streams), part - done)
            y = torch.from_numpy(np.stack([c.take(width) for c in cursors])).to(device)  # [B, T]
            loss, state, pending = _chunk(net, pending, y, state, 0, top, each)
            nats, done = nats + loss, done + width
        state = state[:, :, -1:].contiguous()  # the last stream, alone, to the end of the text
        pending = pending[-1:]
        while len(y := torch.from_numpy(cursors[-1].take(chunk)).to(device)):
            loss, state, pending = _chunk(net, pending, y[None], state, streams - 1, top, each)
            nats, tail = nats + loss, tail + len(y)
    if tokens is None:  # read as it came: one stream
        tokens, missing = tail, cursors[0].unknown
    return nats, tokens, missing


def _chunk(
    net: RNNStack,
    pending: torch.Tensor,
    y: torch.Tensor,
    state: State,
    first_stream: int,
    top: int,
    each: Callable[[Scored], None] | None,
) -> tuple[float, State, torch.Tensor]:
    """Score targets y [B, T] given the inputs before them, pending [B], and the state; -> (nats, state, pending)."""
    x = torch.cat([pending[:, None], y[:, :-1]], 1)  # [B, T]
    logits, state = net(x, state)
    logp = torch.log_softmax(logits.float(), -1)  # [B, T, V]
    lp = logp.gather(-1, y[..., None]).squeeze(-1)  # [B, T]
    if each is not None:
        rank = (logp > lp[..., None]).sum(-1) + 1  # [B, T]
        values, ids = logp.topk(min(top, logp.shape[-1]), -1)  # [B, T, K]
        for b in range(len(y)):
            each(Scored(first_stream + b, y[b], lp[b], rank[b], ids[b], values[b]))
    return -lp.double().sum().item(), state, y[:, -1]


class JsonLines:
    """``score``'s ``each`` for ``format=jsonl``: one object per token, in text order: ``{"char": "e", "logprob":
    -0.31, "rank": 1, "top": [["e", -0.31], ...]}`` (``"byte": 101`` for a byte vocab). Stream 0's lines go
    straight to ``files[0]``, the output; later streams' to the other files (temporary ones: never in memory),
    which ``finish`` appends to it."""

    def __init__(self, vocab: Vocab, files: list[TextIO]):
        self.key, self.files = vocab.unit, files
        self.names = vocab.chars if vocab.unit == "char" else list(range(256))

    def __call__(self, chunk: Scored) -> None:
        names, lines = self.names, []
        tops = zip(chunk.top_ids.tolist(), chunk.top_logprob.tolist(), strict=True)
        rows = zip(chunk.ids.tolist(), chunk.logprob.tolist(), chunk.rank.tolist(), tops, strict=True)
        for i, lp, rank, (ids, values) in rows:
            record = {self.key: names[i], "logprob": lp, "rank": rank}
            if ids:
                record["top"] = [[names[j], v] for j, v in zip(ids, values, strict=True)]
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
        self.files[chunk.stream].writelines(lines)

    def finish(self) -> None:
        for spool in self.files[1:]:
            spool.seek(0)
            shutil.copyfileobj(spool, self.files[0])


@contextmanager
def text_source(opts: ScoreOptions) -> Iterator[str | BinaryIO]:
    """``text`` (escapes decoded, as generate's prompt), the open ``file``, or stdin."""
    if opts.text is not None:
        yield unescape(str(opts.text))
        return
    if opts.file is None:
        yield sys.stdin.buffer
        return
    path = Path(str(opts.file)).expanduser()
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise UserError(f"file={str(path)!r} {what}; pass a UTF-8 text file.")
    try:
        file = path.open("rb")
    except OSError as e:
        raise UserError(f"file={str(path)!r} cannot be read ({e.strerror}); check its permissions.") from None
    with file:
        yield file


def run(cfg: DictConfig) -> ScoreResult:
    """Score as ``cfg`` (conf/score.yaml) says; print the totals (and, with ``format=jsonl``, every character)."""
    opts = ScoreOptions.from_config(cfg)  # every option checked, before the checkpoint is read
    with text_source(opts) as source, ExitStack() as stack:
        model = load_checkpoint(opts.ckpt, map_location=opts.device).eval()
        lines = None
        if opts.format == "jsonl":
            spools = [
                stack.enter_context(tempfile.TemporaryFile("w+", encoding="utf-8")) for _ in range(opts.streams - 1)
            ]
            lines = JsonLines(model.vocab, [sys.stdout, *spools])
        options = {"streams": opts.streams, "unknown": opts.unknown, "chunk": opts.chunk, "top": opts.top}
        result = score(model.net, model.vocab, source, prompt=opts.prompt, each=lines, **options)
        if lines is not None:
            lines.finish()
    if lines is not None:
        print(json.dumps({"summary": result.summary()}))
    else:
        print(describe(result))
    return result


def describe(result: ScoreResult) -> str:
    unit, n, policy = result.unit, result.tokens, result.unknown_policy
    lines = [f"{n:,} {unit}s scored; {result.unknown:,} {unit}s outside the vocab (unknown={policy})"]
    lines.append(
        f"nats {result.nats:.4f} ({result.nats / n:.4f} per {unit}) | {result.bits} {result.bits_per_token:.4f}"
        f" | ppl {result.ppl:.4f}"
    )
    if result.streams > 1:
        lines.append(f"streams={result.streams}: streams 2 to {result.streams} each started from a zero state")
    return "\n".join(lines)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="score")
def _app(cfg: DictConfig) -> None:
    with reported_user_errors():
        run(cfg)


def main() -> None:
    """``charlm-score ckpt=PATH [file=TEXT | text=...] [format=jsonl] [streams=B]``: a text's log-probability."""
    register()
    with hydra_errors_reported("score"):
        check_overrides(sys.argv[1:])
        _app()


if __name__ == "__main__":
    main()
