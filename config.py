"""One command-line convention for every script, and flags generated from a config dataclass.

`Parser` is the argparse parser of sample.py, evaluate.py, data.py inspect, walkthrough.py and,
through `parse`, train.py. It accepts --a-b and --a_b for every option (declared either way, shown
as --a_b), answers an unknown flag in one line with the closest known one ("unknown option
'--num_imgs' (did you mean --num_images?)"), reports every error as one line (ConfigError, which
each script's __main__ turns into its exit message), and renders --help with the defaults written
out and without argparse's %-formatting, so a help text may say "~25%". With
fromfile_prefix_chars="@" the help says how to read flags from a file.

`parse` is in the spirit of nanoGPT's configurator.py: every field of a config dataclass is a flag
--name=value (nested dataclasses give --outer.name=value), parsed to the field's type, with the help
text from the field's metadata; a bare boolean flag means true; `@FILE` reads flags from a file
(# comments). A caller's `defaults` (train.py's: the toy world's) replace the dataclass defaults,
the command line wins, and --help marks the replaced defaults.
"""

import argparse
import dataclasses
import difflib
import sys


def opt(default, help: str, **more):  # noqa: A002
    """A config field with its --help text; optionally choices=(...) and checked low=, high=."""
    return dataclasses.field(default=default, metadata={"help": help, **more})


class ConfigError(ValueError):
    """A bad option or combination of options; the one-line message names it."""


def underscored(flag: str) -> str:
    """The canonical spelling of a long option: --num-images -> --num_images."""
    return "--" + flag[2:].replace("-", "_")


class HelpFormatter(argparse.HelpFormatter):
    """Help text as written, followed by the default; argparse's %-formatting is not applied.

    argparse expands each help string with the % operator, so a literal "25%" garbles the output.
    Here only the placeholders %(default)s, %(prog)s, %(choices)s and %(metavar)s are replaced, and
    "%%" reads as "%", which keeps help strings written for plain argparse correct.
    """

    def _expand_help(self, action):
        text = action.help or ""
        values = {"default": action.default, "prog": self._prog, "metavar": action.metavar}
        values["choices"] = ", ".join(map(str, action.choices)) if action.choices else ""
        for name, value in values.items():
            text = text.replace(f"%({name})s", str(value))
        text = text.replace("%%", "%")
        if self._shows_default(action) and "(default" not in text:
            shown = "''" if action.default == "" else action.default
            text = f"{text} (default: {shown})"
        return text

    @staticmethod
    def _shows_default(action) -> bool:
        """Options with a value to report; --help and store_true flags say nothing by default."""
        no_value = action.default is None or action.default is argparse.SUPPRESS
        flag = isinstance(action, (argparse._StoreTrueAction, argparse._HelpAction))
        return bool(action.option_strings) and not no_value and not flag


class Parser(argparse.ArgumentParser):
    """argparse with the project's convention (see the module docstring)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        if self.fromfile_prefix_chars:
            prefix = self.fromfile_prefix_chars[0]
            files = f"Flags can also be read from a file: {prefix}FILE (# starts a comment)."
            self.epilog = f"{self.epilog}\n\n{files}" if self.epilog else files
        spelling = "Every --a_b option can also be written --a-b."
        self.epilog = f"{self.epilog} {spelling}" if self.epilog else spelling

    def add_argument(self, *names, **kwargs):
        """As argparse's, with long options stored under their underscored spelling."""
        names = [underscored(name) if name.startswith("--") else name for name in names]
        return super().add_argument(*names, **kwargs)

    def error(self, message):
        """One readable line (ConfigError) instead of the usage text and exit status 2."""
        raise ConfigError(message)

    def convert_arg_line_to_args(self, line):
        """@FILE: flags separated by spaces or lines; '#' starts a comment."""
        words = line.split("#")[0].split()
        return [self.canonical(word) for word in words]

    def known_options(self) -> list[str]:
        """Every long option of this parser and of its subcommands' parsers."""
        options = [name for name in self._option_string_actions if name.startswith("--")]
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for subparser in action.choices.values():
                    options += subparser.known_options()
        return options

    def canonical(self, word: str) -> str:
        """--num-images=4 -> --num_images=4 when that is an option; other words stay as they are."""
        if not word.startswith("--"):
            return word
        flag, equals, value = word.partition("=")
        if underscored(flag) in self.known_options():
            return underscored(flag) + equals + value
        return word

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args([self.canonical(word) for word in args], namespace)

    def parse_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        self.refuse_unknown_options(args)
        namespace, unknown = self.parse_known_args(args, namespace)
        if unknown:
            raise ConfigError(self.unknown_message(unknown[0]))
        return namespace

    def refuse_unknown_options(self, args: list[str]):
        """An unknown --flag is named first, before argparse reports a missing required option."""
        known = self.known_options()
        for word in args:
            if word == "--":
                return
            if word.startswith("--") and self.canonical(word).partition("=")[0] not in known:
                raise ConfigError(self.unknown_message(word))

    def unknown_message(self, word: str) -> str:
        """'unknown option '--num_imgs' (did you mean --num_images?)', or an unexpected argument."""
        if not word.startswith("-"):
            return f"unexpected argument {word!r}"
        flag = underscored(word.partition("=")[0])
        close = difflib.get_close_matches(flag, self.known_options(), n=1)
        suggestion = f" (did you mean {close[0]}?)" if close else ""
        return f"unknown option {word!r}{suggestion}"


def flat_fields(cls, prefix: str = "") -> dict:
    """{"beta": Field, "tailorpo.num_steps": Field, ...} over the nested config dataclasses."""
    fields = {}
    for field in dataclasses.fields(cls):
        if dataclasses.is_dataclass(field.type):
            fields.update(flat_fields(field.type, f"{prefix}{field.name}."))
        else:
            fields[prefix + field.name] = field
    return fields


def get_path(cfg, key: str):
    """The value of a dotted key: get_path(cfg, "tailorpo.num_steps") is cfg.tailorpo.num_steps."""
    value = cfg
    for name in key.split("."):
        value = getattr(value, name)
    return value


def set_path(cfg, key: str, value):
    """Sets a dotted key: set_path(cfg, "tailorpo.num_steps", 5) sets cfg.tailorpo.num_steps."""
    owner, _, name = key.rpartition(".")
    setattr(get_path(cfg, owner) if owner else cfg, name, value)


def boolean(text: str) -> bool:
    if text.lower() not in ("true", "1", "yes", "false", "0", "no"):
        raise ValueError(text)
    return text.lower() in ("true", "1", "yes")


def check_bounds(key: str, value, metadata: dict):
    """ConfigError when a value lies outside its field's low= / high= bounds."""
    low = metadata.get("low")
    high = metadata.get("high")
    if low is not None and high is not None and not low <= value <= high:
        raise ConfigError(f"--{key} must be in [{low}, {high}], got {value}")
    if low is not None and value < low:
        raise ConfigError(f"--{key} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ConfigError(f"--{key} must be <= {high}, got {value}")


def no_defaults(given: dict) -> dict:
    """The default `defaults` hook of `parse`: the dataclass defaults stand."""
    return {}


def parse(cls, argv: list[str], description: str = "", defaults=no_defaults,
          defaults_name: str = "the toy world's"):
    """An instance of the config dataclass `cls` from argv.

    defaults(flags given) -> {key: value} replaces the dataclass defaults (train.py: the toy
    world's, chosen by --model); --help shows the defaults in effect, the replaced ones followed by
    `defaults_name`.
    """
    fields = flat_fields(cls)
    cfg = cls()
    parser = Parser(description=description, fromfile_prefix_chars="@", add_help=False)
    parser.add_argument("-h", "--help", action="store_true", help="show this message and exit")
    for key, field in fields.items():
        is_flag = field.type is bool
        parser.add_argument(
            f"--{key}", dest=key, default=None, type=boolean if is_flag else field.type,
            nargs="?" if is_flag else None, const=True if is_flag else None,
            choices=field.metadata.get("choices"), help=field.metadata.get("help", " "))
    given = parser.parse_args(argv)
    given = {key: value for key, value in vars(given).items() if value is not None}
    dataclass_defaults = {key: get_path(cfg, key) for key in fields}
    replaced = defaults(given)
    values = {**dataclass_defaults, **replaced}
    if given.pop("help"):
        print_help(parser, dataclass_defaults, replaced, defaults_name)
        raise SystemExit(0)
    for key, value in {**values, **given}.items():
        check_bounds(key, value, fields[key].metadata)
        set_path(cfg, key, value)
    nested = {key.rpartition(".")[0] for key in fields} - {""}
    for key in sorted(nested):  # Nested configs check their own combinations of values.
        try:
            get_path(cfg, key).validate()
        except ValueError as error:
            raise ConfigError(f"--{key}.{error}") from None
    return cfg


def print_help(parser: Parser, dataclass_defaults: dict, replaced: dict, defaults_name: str):
    """--help with the defaults in effect; those the `defaults` hook changed say whose they are."""
    changed = {key for key, value in replaced.items() if value != dataclass_defaults[key]}
    for action in parser._actions:
        key = action.dest
        if key in changed:
            ours = replaced[key]
            theirs = dataclass_defaults[key]
            action.help = f"{action.help} (default: {ours}, {defaults_name}; otherwise {theirs})"
        if key in dataclass_defaults:
            action.default = replaced.get(key, dataclass_defaults[key])
    if changed:
        parser.epilog = f"Defaults marked '{defaults_name}' are in effect now. {parser.epilog}"
    parser.print_help()
