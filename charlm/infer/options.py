"""The options of charlm-generate (``conf/generate.yaml``) and charlm-score (``conf/score.yaml``), each checked
here, in one place, before a checkpoint is read."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Literal

from charlm import UserError
from charlm.checks import choice, required_ckpt, whole
from charlm.data.vocab import Unknown
from charlm.hardware import resolve_device
from charlm.infer.beam import check_beam
from charlm.infer.generation import GenerationConfig, check_length, unescape
from charlm.nn.rnn import Impl
from charlm.nn.stepper import Quantize

Format = Literal["text", "jsonl"]  # streamed text | one JSON object per sample
ScoreFormat = Literal["summary", "jsonl"]  # the totals | one JSON object per character, then the totals
CHUNK = 1 << 16  # tokens per forward pass, all streams together (logits: CHUNK x V floats), and bytes per read


@dataclass
class SampleOptions:
    """What ``charlm-generate`` / ``generate.py`` is asked to do; ``from_config`` reads the composed config."""

    ckpt: str | None = None
    """A .ckpt written by train.py, or a folder of runs: the newest run's ``checkpoints/best.ckpt`` (required)."""
    prompt: str | None = None
    """Text to continue, with ``\\n``, ``\\t`` and ``\\\\`` decoded; None: start after a newline."""
    prompt_file: str | None = None
    """Or the prompt read from this UTF-8 file, as it is (not both)."""
    length: int = 500
    """New characters after the prompt; the upper bound when ``stop`` is set."""
    num_samples: int = 1
    """Samples drawn in one batch; with ``beam``, the likeliest beams printed."""
    format: Format = "text"
    """``text``: one sample streams, several print one per block; ``jsonl``: one JSON object per sample."""
    seed: int = 0
    """Seed of the sampling generator."""
    device: str = "cpu"
    """cpu, cuda, cuda:N or auto (cuda where there is one)."""
    unknown: Unknown = "error"
    """Prompt characters outside the vocab: refused, the unknown token, or skipped."""
    impl: Impl | None = None
    """None: the layers as trained; or run the same weights through another implementation."""
    quantize: Quantize = "none"
    """``int8``: weight-only int8 matrices (faster on a CPU, approximate); ``none``: exact float32 steps."""
    beam: int = 0
    """0: sample; K: beam search keeping K beams (temperature, top_k and top_p unused)."""
    length_penalty: float = 0.0
    """Beams rank by logprob / length ** length_penalty: 0 the log-probability, 1 its mean per character."""
    threads: int | None = None
    """torch CPU threads while sampling; None: torch's default (one per core)."""
    temperature: float = GenerationConfig.temperature
    """How each next character is drawn: ``GenerationConfig``'s fields (0: greedy)."""
    top_k: int = GenerationConfig.top_k
    """Keep only the k likeliest characters (0: off)."""
    top_p: float = GenerationConfig.top_p
    """Nucleus sampling: the smallest set holding this much probability (1: off)."""
    stop: str | None = GenerationConfig.stop
    """A sample ends with the first occurrence of this text after the prompt (``\\n`` decoded; None: off)."""

    def __post_init__(self) -> None:
        self.ckpt = str(required_ckpt(self.ckpt))
        choice("format", self.format, Format)
        self.device = resolve_device(self.device)
        whole("seed", self.seed, -(2**63), maximum=2**64 - 1, example=0)
        check_length(self.length, self.num_samples)
        choice("unknown", self.unknown, Unknown)
        if self.impl is not None:
            choice("impl", self.impl, Impl)
        choice("quantize", self.quantize, Quantize)
        if self.threads is not None:
            whole("threads", self.threads, 1, example="1 (null: torch's default)")
        if whole("beam", self.beam, 0, example="4 (0: sample)"):
            check_beam(self.beam, self.num_samples, self.length_penalty)
        if isinstance(self.stop, str):
            self.stop = unescape(self.stop)  # 'stop="\\n\\n"': a blank line
        self.settings = GenerationConfig(
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, stop=self.stop
        )
        if self.prompt is not None and self.prompt_file is not None:
            raise UserError("prompt and prompt_file are both given; pass only one of them.")

    @classmethod
    def from_config(cls, cfg: object) -> SampleOptions:
        """The options of a composed ``generate`` config (a mapping with these keys)."""
        return cls(**{f.name: cfg[f.name] for f in fields(cls) if f.name in cfg})

    def read_prompt(self) -> str:
        """``prompt`` with its escapes decoded, or the UTF-8 text of ``prompt_file`` as it is; neither: ""."""
        if self.prompt_file is None:
            return "" if self.prompt is None else unescape(str(self.prompt))
        path = Path(str(self.prompt_file)).expanduser()
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "does not exist"
            raise UserError(f"prompt_file={str(path)!r} {what}; pass a UTF-8 text file.")
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise UserError(
                f"prompt_file={str(path)!r} is not UTF-8 text (bad byte at offset {e.start}); save it as UTF-8."
            ) from None
        except OSError as e:
            raise UserError(
                f"prompt_file={str(path)!r} cannot be read ({e.strerror}); check its permissions."
            ) from None


@dataclass
class ScoreOptions:
    """What ``charlm-score`` is asked to do; ``from_config`` reads the composed config."""

    ckpt: str | None = None
    """A .ckpt written by train.py, a run directory or a folder of runs (required)."""
    file: str | None = None
    """The UTF-8 text file to score, read a chunk at a time (any size, constant memory)."""
    text: str | None = None
    """Or the text itself, escapes decoded as in generate's prompt (not both); neither: stdin."""
    prompt: str | None = None
    """Condition on this text without scoring it; None: the first character follows a newline."""
    unknown: Unknown = "error"
    """Characters outside the vocab: refused, scored as the unknown token, or left out."""
    format: ScoreFormat = "summary"
    """``summary``: the totals; ``jsonl``: one JSON object per character, then the totals."""
    top: int = 0
    """jsonl: also the K likeliest characters at each position, with their log-probabilities."""
    streams: int = 1
    """B > 1: B contiguous parts as one batch (faster); parts 2..B start from a zero state."""
    chunk: int = CHUNK
    """Characters per forward pass (all streams together) and bytes per read: bounds the memory."""
    device: str = "cpu"
    """cpu, cuda, cuda:N or auto (cuda where there is one)."""

    def __post_init__(self) -> None:
        self.ckpt = str(required_ckpt(self.ckpt))
        choice("format", self.format, ScoreFormat)
        choice("unknown", self.unknown, Unknown)
        whole("top", self.top, 0, example=5)
        whole("streams", self.streams, 1, example=8)
        whole("chunk", self.chunk, 1, example=CHUNK)
        self.device = resolve_device(self.device)
        if self.file is not None and self.text is not None:
            raise UserError("file and text are both given; pass only one of them (neither: read stdin).")
        self.prompt = "" if self.prompt is None else unescape(str(self.prompt))

    @classmethod
    def from_config(cls, cfg: object) -> ScoreOptions:
        """The options of a composed ``score`` config (a mapping with these keys)."""
        return cls(**{f.name: cfg[f.name] for f in fields(cls) if f.name in cfg})
