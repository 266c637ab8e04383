"""`rys-forge` command line: one thin command per pipeline stage.

Each command parses and validates its options, calls one library function and prints. Whatever goes wrong
becomes one line on stderr (`RysForgeGroup` is the one place that maps it): library errors
(`RysForgeError`) exit 2 (usage) or 1 (failure), file-system errors name the file and what to do, click's
usage errors exit 2, Ctrl-C exits 130 (SIGTERM 143) at any moment, imports included; set
`RYS_FORGE_DEBUG=1` to see the traceback of an unexpected error.

The commands live in `pipeline.py` (info, rank, build, verify, eval, heal, card, publish) and `research.py`
(sweep, validate, calibrate, learn-score); `framework.py` holds their shared options, checks and printing.
"""

from __future__ import annotations

import click

from rys_forge.cli.framework import RysForgeGroup, quiet_libraries
from rys_forge.cli.pipeline import build, card, eval_command, heal, info, publish, rank, verify
from rys_forge.cli.research import calibrate, learn_score, sweep, validate


@click.group(cls=RysForgeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="rys-forge")
def main() -> None:
    """rys-forge: find, build, verify, evaluate and publish RYS layer-repeat models.

    Pipeline: info -> rank (probe every window) -> build (export a window) -> [heal] -> verify -> eval -> publish.
    Windows are Python slices over decoder layers: i:j means layers i..j-1 (0-based, half-open).
    """
    quiet_libraries()


for command in (info, rank, build, verify, eval_command, heal, card, publish, sweep, validate, calibrate, learn_score):
    main.add_command(command)
