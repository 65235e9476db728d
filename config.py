"""Command-line flags generated from a config dataclass, in the spirit of nanoGPT's configurator.py.

Every field of the dataclass is a flag --name=value (nested dataclasses give --outer.name=value), parsed to
the field's type, with the help text from the field's metadata; a bare boolean flag means true; `@FILE` reads
flags from a file (# comments); --ai-feedback is --ai_feedback. An unknown flag is refused with the closest
known one. A caller's `defaults` (the toy world's) replace the dataclass defaults; the command line wins.
"""

import argparse
import dataclasses
import difflib
from functools import reduce


def opt(default, help: str, **more):  # noqa: A002
    """A config field with its --help text, and optionally choices=(...), low=, high= (checked bounds)."""
    return dataclasses.field(default=default, metadata={"help": help, **more})


class ConfigError(ValueError):
    """A bad option or combination of options; the message names it."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one readable line (ConfigError) instead of the usage text and exit 2
        raise ConfigError(message)

    def convert_arg_line_to_args(self, line):  # @file: flags separated by spaces or lines, # comments
        return line.split("#")[0].split()


def flat_fields(cls, prefix="") -> dict:
    """{"beta": Field, "tailorpo.num_steps": Field, ...} over the nested config dataclasses."""
    nested = lambda f: flat_fields(f.type, f"{prefix}{f.name}.") if dataclasses.is_dataclass(f.type) else {}
    return {k: v for f in dataclasses.fields(cls) for k, v in (nested(f) or {prefix + f.name: f}).items()}


def boolean(text: str) -> bool:
    if text.lower() not in ("true", "1", "yes", "false", "0", "no"):
        raise ValueError(text)
    return text.lower() in ("true", "1", "yes")


def parse(cls, argv: list[str], description: str = "", defaults=lambda given: {}):
    """An instance of the config dataclass `cls` from argv. defaults(flags given) -> {key: value} replacing
    the dataclass defaults (e.g. the toy world's, chosen by --model); --help shows them in effect."""
    fields, cfg = flat_fields(cls), cls()
    parser = Parser(description=description, fromfile_prefix_chars="@", allow_abbrev=False, add_help=False,
                    formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-h", "--help", action="store_true", help="show this message and exit")
    for key, f in fields.items():
        flag = dict(nargs="?", const=True) if f.type is bool else {}
        parser.add_argument(f"--{key}", dest=key, default=None,
                            type=boolean if f.type is bool else f.type, choices=f.metadata.get("choices"),
                            help=f.metadata.get("help", " "), **flag)
    undash = lambda arg: "--" + arg[2:].partition("=")[0].replace("-", "_") + "".join(arg.partition("=")[1:])
    given, unknown = parser.parse_known_args([undash(arg) if arg.startswith("--") else arg for arg in argv])
    for arg in unknown:
        close = difflib.get_close_matches(arg.split("=")[0].lstrip("-").replace("-", "_"), list(fields), n=1)
        raise ConfigError(f"unknown option {arg!r}" + (f" (did you mean --{close[0]}?)" if close else ""))
    given = {key: value for key, value in vars(given).items() if value is not None}
    values = {key: reduce(getattr, key.split("."), cfg) for key in fields} | defaults(given)
    if given.pop("help"):
        parser.set_defaults(**values)
        raise SystemExit(parser.print_help())
    for key, value in {**values, **given}.items():
        low, high = fields[key].metadata.get("low", value), fields[key].metadata.get("high", value)
        if not low <= value <= high:
            raise ConfigError(f"--{key} must be in [{low}, {high}], got {value}" if high != value else
                              f"--{key} must be >= {low}, got {value}")
        *owner, name = key.split(".")
        setattr(reduce(getattr, owner, cfg), name, value)
    for key in {key.rpartition(".")[0] for key in fields} - {""}:  # nested configs check themselves
        try:
            reduce(getattr, key.split("."), cfg).validate()
        except ValueError as error:  # e.g. "eta must be > 0, got 0"
            raise ConfigError(f"--{key}.{error}") from None
    return cfg
