"""The ``glied`` command line: click parses, :mod:`glied.pipeline` does the work.

Keep this module light: torch and the heavy stages are imported inside each command so that
``glied --help`` answers at once. Every user-facing failure is a :class:`glied.errors.GliedError`,
printed as one line by :func:`main` with a non-zero exit, never a traceback.
"""
from __future__ import annotations

import sys

import click

from glied import __version__
from glied.errors import GliedError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="glied")
def cli() -> None:
    """glied: raw photos -> bottom-up regions + MIL attribute words -> GLIED captions."""


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: run the CLI and turn GliedError into one line on stderr, exit 2."""
    try:
        cli.main(args=argv, prog_name="glied", standalone_mode=False)
    except GliedError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)


# ---------------------------------------------------------------------------------------------------------
# Data: the synthetic shapes world and dataset preparation (issue 2)
# ---------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------
# Bottom-up region detector: train-detector, evaluate-detector (issues 3, 9)
# ---------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------
# MIL attribute words: train-attributes, evaluate-attributes (issue 4)
# ---------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------
# Feature cache: extract, import-features, export-features, merge-caches (issue 5)
# ---------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------
# GLIED decoder: train, evaluate (issue 6)
# ---------------------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------------------
# End to end: caption, bundle, demo (issue 7)
# ---------------------------------------------------------------------------------------------------------


if __name__ == "__main__":
    main()
