"""Command-line entry point: ``slicelm <command> ...``.

Each sub-command lives in its own module exposing ``add_parser(subparsers)`` and ``run(args) -> int``,
so commands can be added without touching the others.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys

from slicelm.cli.common import disk_refusal
from slicelm.errors import SlicelmError
from slicelm.version import __version__

# Sub-command name -> module (relative to this package); each module registers its own parser.
# Modules are imported lazily so that
# `slicelm --help` stays fast and a broken optional dependency only affects its own command.
COMMANDS: dict[str, str] = {
    "slice": "slice_cmd",
    "ppl": "ppl_cmd",
    "eval": "eval_cmd",
    "sweep": "sweep_cmd",
    "finetune": "finetune_cmd",
    "export": "export_cmd",
}


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (``slicelm: error: ...``) and exit code 2, like every
    other user mistake, instead of a usage block."""

    def error(self, message: str):  # type: ignore[override]
        print(f"slicelm: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="slicelm", description="SliceGPT for Hugging Face language models.")
    parser.add_argument("--version", action="version", version=f"slicelm {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMANDS.values():
        try:
            module = importlib.import_module(f"slicelm.cli.{module_name}")
        except ModuleNotFoundError as exc:
            if exc.name and exc.name.startswith("slicelm.cli."):
                continue  # command not shipped in this build
            raise
        module.add_parser(sub)
    return parser


# A value that starts like a negative number ("-0.1,0.2", "-1e-3"): argparse takes it for a flag and says
# "expected one argument"; glued to its flag (``--x=-0.1,0.2``) it reaches the flag's own check.
_NEGATIVE_VALUE = re.compile(r"^-\.?\d")


def glue_negative_values(argv: list[str]) -> list[str]:
    """``["--flag", "-0.1,0.2"]`` -> ``["--flag=-0.1,0.2"]`` (slicelm has no flag named -<digit>)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--") and "=" not in token and i + 1 < len(argv) and _NEGATIVE_VALUE.match(argv[i + 1]):
            out.append(f"{token}={argv[i + 1]}")
            i += 2
            continue
        out.append(token)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    raw = glue_negative_values(list(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(raw)
    args.argv = raw  # the command line as given (finetune --num-processes hands it to accelerate's launcher)
    try:
        return int(args.run(args) or 0)
    except SlicelmError as exc:
        print(f"slicelm: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        why = disk_refusal(exc)
        if why is None:
            raise
        # Outputs are staged beside their target and published by rename: a failed write publishes nothing.
        print(
            f"slicelm: error: the disk refused a write ({why}); nothing was published: free space, then run "
            "the same command again",
            file=sys.stderr,
        )
        return 2
    except KeyboardInterrupt:
        print("slicelm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
