"""Operating runs: run names and directories, refused and failed runs, SLURM, the TensorBoard layout, sweeps'
summaries, and what a run prints."""
