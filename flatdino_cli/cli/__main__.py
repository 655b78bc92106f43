"""`python -m flatdino_cli.cli` (and `torchrun -m flatdino_cli.cli`): the `flatdino` command."""

import sys

from flatdino_cli.cli import main

if __name__ == "__main__":  # importing it (the wheel test imports every module) runs nothing
    sys.exit(main())
