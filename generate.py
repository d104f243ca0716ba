"""Sample text from a checkpoint: ``python generate.py ckpt=PATH 'prompt="The Time "' length=500``
(installed: ``charlm-generate``). The code is ``charlm.cli.generate_main``."""

from charlm.cli import generate_main

if __name__ == "__main__":
    generate_main()
