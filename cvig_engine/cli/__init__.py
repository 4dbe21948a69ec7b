"""The `cvig-engine` command line: a thin click layer over the Python API.

Each command lives in its own module of this package and is registered in `COMMAND_MODULES`.
"""
import importlib
import sys

import click

from cvig_engine.errors import CvigInputError, CvigMissingDependency

# module name -> attribute holding the click command (or group)
COMMAND_MODULES = [
    ("synth", "synth_command"),
    ("train", "train_command"),
    ("export", "export_command"),
    ("embed", "embed_command"),
    ("score", "score_command"),
    ("evaluate", "evaluate_command"),
    ("demo", "demo_command"),
    ("locate", "locate_command"),
    ("bench", "bench_group"),
    ("filter", "filter_command"),
]


class _Cli(click.Group):
    """Click group that turns input errors into exit code 2 without a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (CvigInputError, CvigMissingDependency) as error:
            click.echo(f"error: {error}", err=True)
            sys.exit(2)


@click.group(cls=_Cli)
@click.version_option(package_name="cvig-engine")
def main():
    """cvig-engine: batch scoring for cross-view image geolocalization."""


for _module_name, _attribute in COMMAND_MODULES:
    main.add_command(getattr(importlib.import_module(f"cvig_engine.cli.{_module_name}"),
                             _attribute))
