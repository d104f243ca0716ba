"""A callback the DDP test injects from the command line (+callbacks.probe=...): it records each rank's batches."""

import numpy as np
import pytorch_lightning as pl


class RecordBatches(pl.Callback):
    def __init__(self, out: str):
        self.out, self.batches = out, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 0:
            self.batches.append(batch[0].cpu().numpy())

    def on_train_end(self, trainer, pl_module):
        np.save(f"{self.out}/rank{trainer.global_rank}.npy", np.concatenate(self.batches, axis=1))  # [B, L]
