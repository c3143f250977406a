"""The `pipeline` command: a thin click layer over the stage modules.

Modules are imported inside each command so `pipeline --help` stays fast. A UserError becomes one
line on stderr and exit status 2, with no traceback.
"""
from __future__ import annotations

import sys
from pathlib import Path

import click

from .errors import UserError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pipeline")
def main():
    """Show, Attend and Tell: extract features once, train attention decoders, decode, score, caption."""


# ---- datasets (issue 2) -----------------------------------------------------------------------
# SECTION datasets: owned by pipeline/datasets.py, pipeline/synth.py

# ---- extraction (issue 3) ---------------------------------------------------------------------
# SECTION extract: owned by pipeline/extract.py, pipeline/backbones.py, pipeline/weights.py

# ---- training (issue 4) -----------------------------------------------------------------------
# SECTION train: owned by pipeline/train.py

# ---- decoding, scoring, captioning, reports (issue 5) -----------------------------------------
# SECTION score: owned by pipeline/decode.py, score.py, caption.py, viz.py, report.py

# ---- demo -------------------------------------------------------------------------------------
# SECTION demo: owned by pipeline/demo.py

if __name__ == "__main__":
    main()
