"""Sample text from a checkpoint: ``python generate.py ckpt=PATH prompt="The Time " length=500``."""

from __future__ import annotations

import sys

import hydra
import torch
from omegaconf import DictConfig

from charlm import UserError, reported_user_errors
from charlm.module import load_checkpoint
from charlm.sampling import generate


def run(cfg: DictConfig) -> list[str]:
    """Stream one sample to stdout as it is produced, or print ``num_samples`` samples made in one batch."""
    if not cfg.ckpt:
        raise UserError("no checkpoint given; pass ckpt=PATH/TO/best.ckpt.")
    device = "cuda" if cfg.device == "auto" and torch.cuda.is_available() else str(cfg.device).replace("auto", "cpu")
    try:
        torch.device(device)
    except RuntimeError:
        raise UserError(f"device={cfg.device} is not a device; pass device=cpu, cuda, cuda:N or auto.") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device={cfg.device} but no CUDA GPU is available; pass device=cpu.")
    overrides = {"impl": cfg.impl} if cfg.impl else {}
    model = load_checkpoint(cfg.ckpt, map_location=device, **overrides).eval()
    gen = torch.Generator(device).manual_seed(cfg.seed)
    steps = generate(
        model.net,
        model.vocab,
        cfg.prompt,
        cfg.length,
        cfg.temperature,
        cfg.top_k,
        cfg.top_p,
        cfg.num_samples,
        cfg.unknown,
        gen,
    )
    if cfg.num_samples == 1:
        out = [cfg.prompt]
        sys.stdout.write(cfg.prompt)
        for ids in steps:
            out.append(model.vocab.decode(ids.cpu()))
            sys.stdout.write(out[-1])
            sys.stdout.flush()
        sys.stdout.write("\n")
        return ["".join(out)]
    ids = torch.stack(list(steps), dim=1).cpu() if cfg.length else torch.empty(cfg.num_samples, 0, dtype=torch.long)
    texts = [cfg.prompt + model.vocab.decode(row) for row in ids]
    for i, text in enumerate(texts):
        print(f"--- sample {i + 1}/{len(texts)} ---\n{text}")
    return texts


@hydra.main(version_base="1.3", config_path="conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    with reported_user_errors():
        run(cfg)


if __name__ == "__main__":
    main()
