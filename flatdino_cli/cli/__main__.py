"""`python -m flatdino_cli.cli` (and `torchrun -m flatdino_cli.cli`): the `flatdino` command."""

import sys

from flatdino_cli.cli import main

sys.exit(main())
