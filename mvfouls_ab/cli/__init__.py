"""The commands: one small module per command in this package (argparse -> a config object -> one library call).

``mvfouls-ab <command> [options]`` (the console script of pyproject.toml) runs exactly what
``python -m mvfouls_ab.<command>`` runs (a three-line shim at the package's top level): the command's module here
is executed as ``__main__`` with the remaining arguments, so both spellings behave the same (exit codes, signal
handling, ``--help``). Every command reports an error a user can cause the same way (:func:`fail`): one line
``TypeName: what went wrong, where, and the fix`` on stderr, exit code 2.
"""
from __future__ import annotations

import argparse
import copy
import runpy
import sys
import warnings
from collections.abc import Callable
from typing import NoReturn

# command -> (module, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "study": ("mvfouls_ab.cli.study", ("the Optuna study: trials over variants, losses, phases; ranks them, registers "
                                  "the champion model")),
    "train": ("mvfouls_ab.cli.train", "one run of the three-phase trainer from a YAML recipe, tracked in MLflow"),
    "ab": ("mvfouls_ab.cli.ab", "an A/B comparison across seeds and folds with paired statistics"),
    "rank": ("mvfouls_ab.cli.rank", "the leaderboard of a study against the targets"),
    "report": ("mvfouls_ab.cli.report", "a self-contained HTML report of an A/B experiment or a study"),
    "evaluate": ("mvfouls_ab.cli.evaluate", "the official SoccerNet metric of a prediction file, per-class tables"),
    "synth": ("mvfouls_ab.cli.synth", "a synthetic MVFouls data set in the real layout"),
    "download": ("mvfouls_ab.cli.download", "the real MVFouls data set from its gated Hugging Face repo"),
    "predict": ("mvfouls_ab.cli.predict", "official prediction files (and the challenge zip) from a logged model"),
}


def fail(exc: BaseException) -> int:
    """The one error style of every command: ``TypeName: message`` on one line of stderr; returns exit code 2."""
    print(f"{type(exc).__name__}: {' '.join(str(exc).split())}", file=sys.stderr)
    return 2


def script(main: Callable[[], int], signals: bool = False) -> NoReturn:
    """Run a command's main() as a program. ``signals``: SIGTERM / SIGINT stop after the current epoch's checkpoint
    (twice: at once), for the commands that train (study, train, ab)."""
    if signals:
        from .. import shutdown

        shutdown.install()
    sys.exit(main())


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written, and every option's default in its help line (a URL's password shown as ***)."""

    def _expand_help(self, action: argparse.Action) -> str:
        default = action.default
        if isinstance(default, str) and "://" in default and "@" in default:
            from urllib.parse import urlparse

            password = urlparse(default).password
            if password:
                action = copy.copy(action)
                action.default = default.replace(f":{password}@", ":***@")
        return super()._expand_help(action)


def build_parser() -> argparse.ArgumentParser:
    width = max(map(len, COMMANDS))
    listing = "\n".join(f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items())
    p = argparse.ArgumentParser(prog="mvfouls-ab", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Experiment-tracking-centric A/B testing for SoccerNet MVFouls.",
                                epilog=f"commands:\n{listing}\n\n`mvfouls-ab COMMAND --help` shows a command's "
                                       "options; `python -m mvfouls_ab.COMMAND` is the same command.")
    p.add_argument("command", choices=list(COMMANDS), metavar="COMMAND", help="one of: " + ", ".join(COMMANDS))
    p.add_argument("args", nargs=argparse.REMAINDER, help="the command's own options")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    if argv[0] not in COMMANDS:
        parser.error(f"unknown command {argv[0]!r} (choose from {', '.join(COMMANDS)})")
    module = COMMANDS[argv[0]][0]
    saved = sys.argv
    sys.argv = [f"mvfouls-ab {argv[0]}", *argv[1:]]
    try:
        with warnings.catch_warnings():     # the module may be imported already (in-process callers)
            warnings.filterwarnings("ignore", message=".*found in sys.modules", category=RuntimeWarning)
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code
        if code is None:
            return 0
        if isinstance(code, int):
            return code
        print(code, file=sys.stderr)
        return 1
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
