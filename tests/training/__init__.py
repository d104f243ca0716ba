"""Tests of charlm.training: training: the LightningModule, checkpoints, exact resume, precision."""
