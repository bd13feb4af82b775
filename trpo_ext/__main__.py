"""`python -m trpo_ext ...` is the `trpo-ext` command (what torchrun launches: `torchrun ... -m trpo_ext train ...`)."""
import sys

from .cli import main

sys.exit(main())
