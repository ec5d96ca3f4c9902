"""The `mmkit` command line. Each subcommand parses flags into the Python API and makes one public call."""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import sys

import click

from mmkit.errors import MmkitError

# name -> "module:attribute"; imported only when that command runs, so `mmkit --help` stays fast.
COMMANDS = {
    "eval": "mmkit.cli.eval:eval_command",
    "export": "mmkit.cli.export:export",
    "generate": "mmkit.cli.generate:generate",
    "report": "mmkit.cli.report:report",
    "info": "mmkit.cli.info:info",
    "methods": "mmkit.cli.methods:methods",
    "world": "mmkit.cli.world:world",
}
OPTIONAL_COMMANDS = {
    "train-reference": "mmkit.cli.train_reference:train_reference",
    "tune": "mmkit.cli.tune:tune",
    "train-gates": "mmkit.cli.train_gates:train_gates",
    "train-visor": "mmkit.cli.train_visor:train_visor",
    "train-sam": "mmkit.cli.train_sam:train_sam",
    "ground": "mmkit.cli.ground:ground",
    "bench": "mmkit.cli.speed:bench",
}


class MmkitGroup(click.Group):
    """Lazy subcommands, and one-line errors (exit code 2) instead of tracebacks for bad input."""

    def _table(self) -> dict[str, str]:
        table = dict(COMMANDS)
        for name, target in OPTIONAL_COMMANDS.items():
            module = target.split(":")[0]
            if importlib.util.find_spec(module) is not None:
                table[name] = target
        return table

    def list_commands(self, ctx):
        return sorted(self._table())

    def get_command(self, ctx, name):
        target = self._table().get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        return getattr(importlib.import_module(module), attr)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except MmkitError as err:
            click.echo(f"error: {err}", err=True)
            ctx.exit(2)
        except click.UsageError as err:
            # click prints usage, a hint and the error on three lines; one line says the same.
            names, sub = [], err.ctx
            while sub is not None and sub.parent is not None:  # the root's name depends on how mmkit was started
                names.insert(0, sub.info_name)
                sub = sub.parent
            click.echo(f"error: {err.format_message()} (see `{' '.join(['mmkit', *names])} --help`)", err=True)
            ctx.exit(2)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except BrokenPipeError:
            # The reader went away (`mmkit methods | head`): stop quietly, as a command killed by SIGPIPE does,
            # and keep Python's exit-time flush of stdout from raising again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(141)
        except Exception as err:  # noqa: BLE001 - the CLI's last line of defence; MMKIT_DEBUG=1 shows the trace
            if os.environ.get("MMKIT_DEBUG"):
                raise
            first = str(err).splitlines()[0] if str(err) else ""
            click.echo(f"internal error: {type(err).__name__}: {first} (set MMKIT_DEBUG=1 for a traceback)", err=True)
            ctx.exit(1)


@click.group(cls=MmkitGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mmkit-vlm", prog_name="mmkit")
@click.option("-v", "--verbose", is_flag=True, help="Log progress and backend choices.")
def main(verbose: bool) -> None:
    """mmkit: faster and more truthful LLaVA-class vision-language models."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if not verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
