# `python -m pipeline ...` (also what torchrun runs: `torchrun ... -m pipeline train ...`).
from pipeline.cli import main

main()
