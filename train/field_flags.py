"""absl flags made from config fields: the binary's, and those an experiment passes on.

Each flag has its field's type, default and help, and a validator that runs
the field's check, so a bad value stops the command before any work. A flag
is defined once per process: a command imported after another that defined
it (tests import several) shares the definition.
"""

from __future__ import annotations

import sys

from absl import flags

from train.config import Field


class _NoneOr(flags.ArgumentParser):
    """`parser`'s values, or None for "none" (a setting whose default None means "the default")."""

    def __init__(self, parser: flags.ArgumentParser):
        self.parser = parser
        self.syntactic_help = f"{parser.syntactic_help or parser.flag_type()} or none"

    def parse(self, argument):
        if argument is None or (isinstance(argument, str) and argument.strip().lower() == "none"):
            return None
        return self.parser.parse(argument)

    def flag_type(self) -> str:
        return f"{self.parser.flag_type()} or none"


def make_flag(field: Field) -> flags.Flag:
    """The absl flag of `field`: its type, default and help ("none" for a None default)."""
    help_text = f"[{field.group}] {field.help}"
    default = field.default
    if field.kind == "bool":
        return flags.BooleanFlag(field.name, default, help_text)
    if field.kind == "list":
        parser, serializer = flags.ListParser(), flags.CsvListSerializer(",")
        value = None if default is None else [str(v) for v in default]
    else:
        parser = {"int": flags.IntegerParser, "float": flags.FloatParser}.get(
            field.kind, flags.ArgumentParser
        )()
        serializer = flags.ArgumentSerializer()
        value = str(default) if field.kind == "str" and default is not None else default
    if default is None and field.kind != "str":
        parser = _NoneOr(parser)
    return flags.Flag(parser, serializer, field.name, value, help_text)


def main_module(name: str) -> str:
    """The name absl lists a module's flags under: sys.argv[0] for `__main__`."""
    return sys.argv[0] if name == "__main__" else name


def define_once(flag: flags.Flag, module_name: str, key_of: str | None = None) -> bool:
    """Defines `flag` under `module_name` unless a command imported earlier did.

    `key_of` (a module's `__name__`): its `--help` lists the flag. Returns
    whether the flag was defined here.
    """
    defined = flag.name not in flags.FLAGS
    if defined:
        flags.DEFINE_flag(flag, module_name=main_module(module_name))
    if key_of:
        flags.FLAGS.register_key_flag_for_module(main_module(key_of), flags.FLAGS[flag.name])
    return defined


def define(field: Field, module_name: str, key_of: str | None = None) -> None:
    """Defines `field`'s flag (once), listed under `module_name`, checked by `field.check`."""
    if not define_once(make_flag(field), module_name, key_of):
        return

    def checker(value, field=field):
        try:
            field.check(value, field.name)
        except ValueError as error:
            raise flags.ValidationError(str(error)) from None
        return True

    flags.register_validator(field.name, checker)
