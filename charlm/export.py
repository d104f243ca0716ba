"""``charlm-export ckpt=PATH [format=onnx] [out=PATH.onnx]``: a checkpoint as one ONNX step model plus its vocab.

The model is one character per stream, ``(ids [N] int64, state [S, L, N, H] float32) -> (logits [N, V], state_out
[S, L, N, H])`` with N dynamic and S the cell's state slots (``CellSpec.slots``: 2, h and C, for the LSTM). It runs
``Stepper``'s math, the layer-0 projection table, the cell's step equations and the decoder, so it serves every
registered cell, whatever its ``impl``, layer norm included. A consumer reads the prompt one character at a time
from the zero state, then samples; ``<stem>.vocab.json`` beside the model holds what it needs for that (see
``vocab_metadata``).

Needs the ``export`` extra (onnx and onnxscript; onnxruntime to run the result); the rest of charlm does not.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys
import warnings
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from torch import nn

from charlm import UserError, reported_user_errors
from charlm.checks import required_ckpt
from charlm.config import CONF_DIR
from charlm.infer.generation import start_ids
from charlm.nn.rnn import RNNStack
from charlm.nn.stepper import Stepper
from charlm.overrides import check_overrides, hydra_errors_reported
from charlm.training.checkpoint import write_atomic
from charlm.training.module import CharLM, load_checkpoint

FORMATS = ("onnx",)
VOCAB_FORMAT = 2  # the layout of <stem>.vocab.json; 2: "chars" for byte models too (format 1: null)
INSTALL = 'pip install "charlm-lightning[export]" (in a checkout: pip install -e ".[export]")'


class StepGraph(nn.Module):
    """``Stepper`` as a module for ``torch.onnx.export``: its precomputed tensors become the graph's constants."""

    def __init__(self, net: RNNStack):
        super().__init__()
        self.step = Stepper(net)

    def forward(self, ids: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.step(ids, state)  # [N] int64, [S, L, N, H] -> [N, V], [S, L, N, H]


def vocab_metadata(model: CharLM) -> dict:
    """What a consumer of the step model needs besides the graph.

    ``unit``: ``char``, or ``byte`` (id = byte value; text is UTF-8); ``chars``: the character of each id, in id
    order; for bytes ``chr(id)``, so the same lookups serve the UTF-8 bytes of a text read as Latin-1 (the README's
    loop); ``state_shape``: the zero state of one stream, [S, L, 1, H]
    (N streams: N in place of the 1); ``start``: the character ``charlm-generate`` feeds, unechoed, when the
    prompt is empty; ``unk`` (or null): where ``unknown=unk`` maps characters outside ``chars``."""
    net, vocab = model.net, model.vocab
    return {
        "format": VOCAB_FORMAT,
        "unit": vocab.unit,  # byte: id = the byte's value = the code point of its entry in "chars"
        "chars": "".join(vocab.chars) if vocab.unit == "char" else "".join(map(chr, range(len(vocab)))),
        "unk": vocab.unk,
        "start": vocab.decode(start_ids(vocab, "")),
        "cell": net.cell,
        "state_shape": [net.state_slots, net.num_layers, 1, net.hidden_size],
    }


def require_onnx() -> None:
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"format=onnx needs {' and '.join(missing)}, which the default install lacks; {INSTALL}.")


def vocab_path_for(onnx_path: Path) -> Path:
    """``dir/model.onnx`` -> ``dir/model.vocab.json``."""
    return onnx_path.with_suffix(".vocab.json")


def export_onnx(model: CharLM, out_path: str | Path) -> tuple[Path, Path]:
    """Write ``model`` as the ONNX step model to ``out_path`` and its vocab to ``<out_path stem>.vocab.json``, each
    atomically (a failed export leaves an earlier one intact); return the two paths."""
    require_onnx()
    onnx_path = Path(out_path)
    vocab_path = vocab_path_for(onnx_path)
    net = model.net
    graph = StepGraph(net).eval()
    device = graph.step.table.device
    # torch.export specialises a dimension whose example size is 0 or 1, so the example batch is 2.
    example = (torch.zeros(2, dtype=torch.long, device=device), net.init_state(2, device))
    n = torch.export.Dim("N")
    exporter_log = logging.getLogger("torch.onnx")  # "torchvision is not installed" lines on every export
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():  # the exporter's notes on its own internals, nothing a user can act on
            warnings.simplefilter("ignore")
            # dynamo=True, torch's default: torch.export traces Stepper as it is, every cell and LayerNorm
            # included, so the deprecated TorchScript exporter (dynamo=False) is never needed.
            program = torch.onnx.export(
                graph,
                example,
                dynamo=True,
                input_names=["ids", "state"],
                output_names=["logits", "state_out"],
                dynamic_shapes={"ids": {0: n}, "state": {2: n}},
                verbose=False,
            )
    finally:
        exporter_log.setLevel(level)
    proto = program.model_proto.SerializeToString()
    onnx_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(onnx_path, lambda f: f.write(proto))
    meta = json.dumps(vocab_metadata(model), ensure_ascii=False) + "\n"
    write_atomic(vocab_path, lambda f: f.write(meta.encode("utf-8")))
    return onnx_path, vocab_path


def check_writable(folder: Path) -> None:
    """Refuse an ``out=`` whose folder cannot be written, or made (``mkdir -p``), before the export's work."""
    existing = folder.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"out= is inside {str(existing)!r}, which is a file; pass out= in a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        made = "" if existing == folder.absolute() else f" to make {str(folder)!r} in"
        raise UserError(
            f"out= needs a folder it can write, but {str(existing)!r} is read-only{made}; pass out=PATH.onnx in a"
            " folder you can write, or change its permissions."
        )


def _same_file(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))


def export(cfg: DictConfig) -> tuple[Path, Path]:
    """Check the settings, load ``cfg.ckpt``, write the model in ``cfg.format``; return the paths written."""
    ckpt = required_ckpt(cfg.ckpt)
    if cfg.format not in FORMATS:
        raise UserError(f"format={cfg.format!r} is not a known export format; use one of: {', '.join(FORMATS)}.")
    onnx_path = Path(cfg.out) if cfg.out else ckpt.with_suffix(".onnx")
    targets = (onnx_path, vocab_path_for(onnx_path))
    check_writable(onnx_path.parent)
    require_onnx()
    for path in targets:
        if path.is_dir():
            raise UserError(f"out={str(path)!r} is a directory; pass a file path, e.g. out={path / 'model.onnx'}.")
        if _same_file(path, ckpt):
            raise UserError(f"exporting to {str(path)!r} would overwrite the checkpoint; pass out=PATH.onnx.")
    replaced = [str(p) for p in targets if p.exists()]  # an earlier export: said below, not silently
    try:
        paths = export_onnx(load_checkpoint(ckpt), onnx_path)
    except OSError as e:  # a full disk, a folder made read-only meanwhile: the earlier files stay whole
        where = e.filename or onnx_path.parent
        raise UserError(
            f"cannot write {str(where)!r} ({e.strerror}); pass out=PATH.onnx in a folder you can write."
        ) from None
    size = paths[0].stat().st_size / 2**20
    note = f"; replaced {', '.join(replaced)}" if replaced else ""
    print(f"wrote {paths[0]} ({size:.1f} MiB) and {paths[1]}{note}")
    return paths


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="export")
def _app(cfg: DictConfig) -> None:
    with reported_user_errors():
        export(cfg)


def main() -> None:
    """``charlm-export ckpt=PATH [format=onnx] [out=PATH.onnx]``: the checkpoint as an ONNX step model."""
    with hydra_errors_reported("export"):
        check_overrides(sys.argv[1:])
        _app()


if __name__ == "__main__":
    main()
