"""Options of the training commands: declared once, set from defaults < a TOML file < flags.

A command lists its :class:`Option` s (by hand, or derived from a config dataclass with
:func:`options_from_dataclass`). :func:`add_options` turns them into argparse flags
(``--max-steps``) plus ``--config FILE``; :func:`resolve` merges the three sources and checks
every value. In the TOML file each option lives in the table named by its ``section``::

    output_dir = "runs/llama"       # section "" : top level
    [train]
    max_steps = 300
    lr = 1e-3

A wrong file, an unknown key or a value of the wrong type raises :class:`ConfigError` with a
one-line message naming the path and the key; the CLI prints it and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from dataclasses import dataclass
from typing import Any

KINDS = ("int", "float", "str", "bool", "list", "str_or_list", "names")
# TrainerConfig.steady_alloc, as the training commands describe it
STEADY_ALLOC_HELP = ("keep freed memory in the process (glibc mallopt, as `fastpt bench --alloc steady`): "
                     "no page faults on each step's fresh tensors")


class ConfigError(ValueError):
    """A bad config file or option value (the message names the file, key or flag)."""


@dataclass(frozen=True)
class Option:
    name: str                       # Python name; the flag is --name-with-dashes
    kind: str                       # one of KINDS
    default: Any
    help: str = ""
    section: str = ""               # TOML table ("" = top level)
    choices: tuple | None = None
    input_path: bool = False        # a file or folder that must exist
    optional: bool = False          # None is allowed (and is the "unset" value)
    field: str = ""                 # the config dataclass field it sets (default: name)
    minimum: int | float | None = None  # smallest allowed value of an int or float option

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"option {self.name}: kind {self.kind!r} not in {KINDS}")
        if self.minimum is not None and self.kind not in ("int", "float"):
            raise ValueError(f"option {self.name}: a minimum needs kind int or float, not {self.kind!r}")

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def key(self) -> str:
        return f"{self.section}.{self.name}" if self.section else self.name


def _kind_of(annotation: str) -> str:
    """The option kind of a dataclass field's (string) annotation."""
    text = annotation.replace(" ", "")
    for kind in ("bool", "int", "float", "str"):
        if text in (kind, f"{kind}|None"):
            return kind
    if text.startswith(("tuple", "list")):
        return "list"
    return "str_or_list"


def options_from_dataclass(cls, section: str, *, skip: tuple = (), helps: dict | None = None,
                           rename: dict | None = None) -> list[Option]:
    """One option per field of the dataclass ``cls`` (defaults and kinds from the fields);
    ``rename`` maps a field to another option name (when two sections share a field name)."""
    out = []
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        annotation = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        out.append(Option((rename or {}).get(f.name, f.name), _kind_of(annotation), default,
                          (helps or {}).get(f.name, ""), section,
                          optional="None" in annotation or default is None, field=f.name))
    return out


# -- argparse ------------------------------------------------------------------------------

def _parse_flag(option: Option):
    """argparse ``type`` for a flag's text."""
    def parse(text: str):
        if option.optional and text.lower() == "none":
            return None
        if option.kind == "str_or_list":  # one string from a flag: a prompt or a stop string
            return text                      # may hold commas (several: a TOML list)
        if option.kind == "names":  # module names hold no commas: "q_proj,v_proj" is two
            names = [s.strip() for s in text.split(",") if s.strip()]
            return names if "," in text else text
        if option.kind == "list":
            return [_number_or_text(s.strip()) for s in text.split(",") if s.strip()]
        try:
            return {"int": int, "float": float, "str": str}[option.kind](text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a valid {option.kind}") from None
    return parse


def _number_or_text(text: str):
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text


def add_options(parser: argparse.ArgumentParser, options: list[Option]) -> None:
    """``--config FILE`` and one flag per option; flags not given stay absent from the
    namespace (so that the config file's values survive)."""
    parser.add_argument("--config", metavar="FILE.toml",
                        help="TOML file with options (flags override it); see configs/")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for o in options:
        title = f"[{o.section}]" if o.section else "general"
        group = groups.setdefault(o.section, parser.add_argument_group(title))
        default_text = ("none" if o.default is None else ",".join(map(str, o.default))
                        if isinstance(o.default, (list, tuple)) else o.default)
        help_text = f"{o.help} (default: {default_text})" if o.help else f"(default: {default_text})"
        if o.kind == "bool":
            group.add_argument(o.flag, dest=o.name, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(o.flag, dest=o.name, type=_parse_flag(o), choices=o.choices,
                               default=argparse.SUPPRESS, metavar=o.kind.upper() if not o.choices else None,
                               help=help_text)


# -- TOML ----------------------------------------------------------------------------------

_TYPE_NAMES = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
               "list": "a list", "str_or_list": "a string or a list of strings",
               "names": "a name or a list of names"}


def _type_ok(kind: str, value) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "str":
        return isinstance(value, str)
    if kind == "list":
        return isinstance(value, list)
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))


def check_input_file(path: str, key: str) -> None:
    """A file to read: a ConfigError naming ``key`` when it is missing or is a folder."""
    if os.path.isdir(path):
        raise ConfigError(f"{key}: {path} is a folder; give a file")
    if not os.path.isfile(path):
        raise ConfigError(f"{key}: no such file: {path}")


def read_toml(path: str) -> dict:
    """The table of the --config file ``path``; ConfigError when it is missing, a folder or
    not valid TOML."""
    check_input_file(path, "--config")
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from None


def load_toml(path: str, options: list[Option]) -> dict:
    """The option values set in the TOML file ``path``, checked against ``options``."""
    data = read_toml(path)
    by_key = {o.key: o for o in options}
    sections = {o.section for o in options if o.section}
    values = {}
    for name, value in data.items():
        items = value.items() if name in sections and isinstance(value, dict) else [(None, value)]
        for sub, v in items:
            key = f"{name}.{sub}" if sub is not None else name
            option = by_key.get(key)
            if option is None:
                hint = _where_is(key, options)
                raise ConfigError(f"{path}: unknown key '{key}'{hint}")
            if not _type_ok(option.kind, v):
                raise ConfigError(f"{path}: key '{key}' must be {_TYPE_NAMES[option.kind]}, "
                                  f"got {type(v).__name__} {v!r}")
            if option.kind == "float":
                v = float(v)
            values[option.name] = v
    return values


def _where_is(key: str, options: list[Option]) -> str:
    """' (it belongs in [train])' when the key's last part is an option of another section."""
    last = key.rsplit(".", 1)[-1]
    for o in options:
        if o.name == last:
            return f" (did you mean '{o.key}'?)"
    return ""


# -- merging -------------------------------------------------------------------------------

def resolve(args: argparse.Namespace, options: list[Option]) -> dict:
    """Defaults, then ``--config``, then flags; checks choices, minimums and input paths."""
    values = {o.name: o.default for o in options}
    if getattr(args, "config", None):
        values.update(load_toml(args.config, options))
    for o in options:
        if hasattr(args, o.name):
            values[o.name] = getattr(args, o.name)
    for o in options:
        v = values[o.name]
        if v is None:
            continue
        if o.choices is not None and v not in o.choices:
            raise ConfigError(f"{o.key}: {v!r} is not one of {', '.join(map(str, o.choices))}")
        if o.minimum is not None and not v >= o.minimum:  # `not >=` also refuses nan
            raise ConfigError(f"{o.key}: expected {_TYPE_NAMES[o.kind]} >= {o.minimum}, got {v!r}")
        if o.input_path and not os.path.exists(v):
            raise ConfigError(f"{o.key}: no such file or folder: {v}")
    return values


def section_values(values: dict, options: list[Option], section: str) -> dict:
    """``{field: value}`` of the options in ``section``: the keyword arguments of the config
    dataclass the section was derived from."""
    return {o.field or o.name: values[o.name] for o in options if o.section == section}
