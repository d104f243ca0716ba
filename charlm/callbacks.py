"""Only what Lightning lacks: a text sample written to TensorBoard at the end of every validation."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from charlm.sampling import sample_text


class TextSample(pl.Callback):
    """Log ``length`` sampled characters after ``prompt`` as TensorBoard text, on rank 0, after each validation.

    Prompt characters the vocab lacks are skipped, so a preset prompt never stops training.
    """

    def __init__(self, prompt: str = "The ", length: int = 200, temperature: float = 0.8, seed: int = 0):
        self.prompt, self.length, self.temperature, self.seed = prompt, length, temperature, seed

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        generator = torch.Generator(pl_module.device).manual_seed(self.seed)
        text = sample_text(
            pl_module.net,
            pl_module.vocab,
            self.prompt,
            self.length,
            temperature=self.temperature,
            unknown="skip",
            generator=generator,
        )[0]
        # Indented lines render verbatim in TensorBoard's markdown, keeping the model's line breaks.
        block = "\n".join("    " + line for line in text.split("\n"))
        for logger in loggers:
            logger.experiment.add_text("sample", block, trainer.global_step)
