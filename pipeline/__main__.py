# `python -m pipeline ...` (also what torchrun runs: `torchrun ... -m pipeline train ...`).
from .cli import main

main()
