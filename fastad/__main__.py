"""`python -m fastad …`: the `fastad` command (also what `torchrun … -m fastad train …` runs)."""
import sys

from .cli import main

sys.exit(main())
