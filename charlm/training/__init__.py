"""Training a network: the LightningModule, optimisers and schedules, checkpoints and the resume contract,
fine-tuning, charlm's callbacks, and Lightning's errors translated for the user."""
