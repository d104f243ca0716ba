"""Train a character language model: ``python train.py [hydra overrides]`` (installed: ``charlm-train``).

The configs live in conf/; the code in ``charlm.cli.train_main``."""

from charlm.cli import train_main

if __name__ == "__main__":
    train_main()
