"""Step parameters declared once, as frozen dataclasses, and everything derived from them.

Each step's parameters are one frozen dataclass (``llm_packager.config.specs``): a field per
parameter,
with its Python type, its default and a one-line help. From that one declaration come

- the step's command-line parser (`parse_arguments`), so no step writes argparse code;
- the canonical strings MLflow logs for it (`as_mlflow_parameters`), which the reuse key hashes;
- the step's MLproject entry point (`mlproject_entry_point`; ``python -m llm_packager.generate``
  writes MLproject from it);
- the typed schema of the step's conf/ section (`config_schema_fields`), and the step's values
  from a composed config, matched by field name (`config_values`);
- the parameter tables of docs/configuration.md (`markdown_rows`).

A field has one of three roles: ``config`` (from the step's conf/ section, by the same name),
``upstream`` (run ids of earlier steps, which ``main`` passes on) or ``pipeline`` (computed by
``main``, e.g. a content hash). How a field's value is written as text, parsed back and stored in
conf/ is its `Codec`, chosen from the field's type.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from omegaconf import MISSING

from llm_packager.choices import choice_names

ROLE_CONFIG = "config"
ROLE_UPSTREAM = "upstream"
ROLE_PIPELINE = "pipeline"
_BOOLEAN_TEXT = {"true": True, "false": False}
# MLproject defaults are written as YAML scalars of the parameter's type.
_YAML_SCALAR: dict[str, Callable[[str], Any]] = {"string": str, "int": int, "float": float}


@dataclass(frozen=True)
class Codec:
    """How one parameter type is written as text, read back, and kept in conf/.

    Attributes:
        mlproject_type: the MLproject parameter type (``string``, ``int`` or ``float``).
        to_text: the canonical text of a value: what MLflow logs and the reuse key hashes.
        from_text: parses command-line text; raises ValueError naming what it expects.
        config_type: the type of the conf/ schema field.
        from_config: turns a composed conf/ value into the Python value.
        to_config: turns a Python default into the conf/ schema default.
        expects: how a value is written, for help texts (empty: obvious from the type).
    """

    mlproject_type: str
    to_text: Callable[[Any], str]
    from_text: Callable[[str], Any]
    config_type: Any
    from_config: Callable[[Any], Any] = lambda value: value
    to_config: Callable[[Any], Any] = lambda value: value
    expects: str = ""


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected an integer, got '{text}'") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"expected a number, got '{text}'") from None


def _boolean(text: str) -> bool:
    try:
        return _BOOLEAN_TEXT[text.strip().lower()]
    except KeyError:
        raise ValueError(f"expected true or false, got '{text}'") from None


def parse_key_values(text: str) -> dict[str, str]:
    """``key=value`` pairs separated by commas or spaces. A comma-separated ``group:type`` part
    (with ``:``, without ``=``) continues the value before it, so the builder's list values stay
    whole: ``matmul_mixed_precision=last_matmul:int8,mixed_layers:int8`` is one option. Any
    other part without ``=`` is refused, as a typo such as ``accuracy_level=4,block_size``.

    Raises:
        ValueError: naming a pair without ``=``.
    """
    options: dict[str, str] = {}
    for words in text.split():
        key = None
        for part in words.split(","):
            if key is not None and ":" in part and "=" not in part:
                options[key] += f",{part}"
                continue
            pair_key, separator, value = part.partition("=")
            if not part:
                continue
            if not separator or not pair_key or not value:
                raise ValueError(f"'{part}' is not key=value")
            key, options[pair_key] = pair_key, value
    return options


def format_key_values(options: Mapping[str, object]) -> str:
    """The inverse of `parse_key_values`, sorted so equal options give equal strings."""
    return ",".join(f"{key}={options[key]}" for key in sorted(options))


STRING = Codec("string", str, str, str)
INTEGER = Codec("int", lambda value: str(int(value)), _integer, int, int)
# repr() is how MLflow logs a float parameter, so 1 and 1.0 give the same text.
FLOAT = Codec("float", lambda value: repr(float(value)), _number, float, float)
# MLflow logs Python booleans as True/False (a model_config's do_sample, for one), so the
# parameter uses the same text and the two never conflict on one run; any case is accepted.
BOOLEAN = Codec(
    "string", lambda value: str(bool(value)), _boolean, bool, bool, expects="true/false"
)
STRINGS = Codec(
    "string",
    lambda values: ",".join(values),
    lambda text: tuple(part.strip() for part in text.split(",") if part.strip()),
    list[str],
    lambda values: tuple(str(value) for value in values),
    list,
    expects="comma-separated",
)
KEY_VALUES = Codec(
    "string",
    format_key_values,
    parse_key_values,
    dict[str, str],
    lambda mapping: {str(key): str(value) for key, value in mapping.items()},
    dict,
    expects="key=value,...",
)


def enum_codec(enumeration: type[Enum]) -> Codec:
    """Text is the member's value; conf/ keeps the member, so OmegaConf checks the choice."""

    def parse(text: str) -> Enum:
        try:
            return enumeration(text)
        except ValueError:
            raise ValueError(f"'{text}' is not one of {choice_names(enumeration)}") from None

    return Codec(
        "string", lambda member: enumeration(member).value, parse, enumeration, enumeration,
        expects=choice_names(enumeration),
    )  # fmt: skip


def parameter(help: str, default: Any = dataclasses.MISSING, *, codec: Codec | None = None) -> Any:
    """A parameter taken from the step's conf/ section (same name); no default: required."""
    return _field(ROLE_CONFIG, help, default, codec=codec)


def upstream(help: str, *steps: str, every_log_step: bool = False) -> Any:
    """Run id(s) of earlier steps (``steps``, entry points), which ``main`` passes on. A ``str``
    field takes exactly one run; a ``tuple[str, ...]`` field takes every run of those steps.
    ``every_log_step``: the log steps of every declared runtime, resolved when main plans
    (``llm_packager.config.specs.upstream_steps``), so a new runtime's runs are taken too."""
    return _field(ROLE_UPSTREAM, help, dataclasses.MISSING, steps=steps,
                  every_log_step=every_log_step)  # fmt: skip


def computed(help: str, default: Any) -> Any:
    """A parameter ``main`` computes (not a conf/ key), with a default for runs by hand."""
    return _field(ROLE_PIPELINE, help, default)


def _field(role: str, help: str, default: Any, **metadata: Any) -> Any:
    metadata = {"role": role, "help": help, **metadata}
    if isinstance(default, dict):
        frozen = dict(default)
        return dataclasses.field(default_factory=lambda: dict(frozen), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


_ROLE_ORDER = {ROLE_UPSTREAM: 0, ROLE_PIPELINE: 1, ROLE_CONFIG: 2}


def fields_of(spec: type, role: str | None = None) -> list[dataclasses.Field]:
    """The fields of a spec, optionally only those of one role: upstream run ids first, then
    computed ones, then the rest in declaration order (inherited fields before their class's)."""
    chosen = [f for f in dataclasses.fields(spec) if role is None or f.metadata["role"] == role]
    return sorted(chosen, key=lambda f: _ROLE_ORDER[f.metadata["role"]])


def codec_of(spec: type, field: dataclasses.Field) -> Codec:
    """The codec of a field: given explicitly, or chosen from its type."""
    if explicit := field.metadata.get("codec"):
        return explicit
    hint = typing.get_type_hints(spec)[field.name]
    by_type = {str: STRING, int: INTEGER, float: FLOAT, bool: BOOLEAN,
               tuple[str, ...]: STRINGS, dict[str, str]: KEY_VALUES}  # fmt: skip
    if hint in by_type:
        return by_type[hint]
    if isinstance(hint, type) and issubclass(hint, Enum):
        return enum_codec(hint)
    raise TypeError(f"{spec.__name__}.{field.name}: no codec for type {hint}; pass codec=")


def default_of(field: dataclasses.Field) -> Any:
    """A field's default value, or dataclasses.MISSING when the parameter is required."""
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def takes_many_runs(spec: type, field: dataclasses.Field) -> bool:
    """Whether an upstream field takes every run of its steps (a tuple) rather than one."""
    return typing.get_type_hints(spec)[field.name] == tuple[str, ...]


def as_mlflow_parameters(values: object) -> dict[str, str]:
    """Every parameter of a spec instance as the canonical text MLflow logs."""
    spec = type(values)
    return {
        field.name: codec_of(spec, field).to_text(getattr(values, field.name))
        for field in fields_of(spec)
    }


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def argument_parser(spec: type, description: str) -> argparse.ArgumentParser:
    """A parser with one ``--flag`` per field, typed, defaulted and described by the spec."""
    parser = argparse.ArgumentParser(description=description)
    for field in fields_of(spec):
        codec = codec_of(spec, field)
        default = default_of(field)

        def parse(text: str, codec: Codec = codec) -> Any:
            try:
                return codec.from_text(text)
            except ValueError as error:
                raise argparse.ArgumentTypeError(str(error)) from None

        help_text = field.metadata["help"] + (f" ({codec.expects})" if codec.expects else "")
        if default is dataclasses.MISSING:
            parser.add_argument(
                _flag(field.name), dest=field.name, type=parse, required=True, help=help_text
            )
        else:
            # The default is the typed value: argparse would parse a default given as text.
            parser.add_argument(
                _flag(field.name), dest=field.name, type=parse, default=default,
                help=f"{help_text}; default {codec.to_text(default)!r}",
            )  # fmt: skip
    return parser


def parse_arguments(spec: type, argv: list[str], description: str = "") -> Any:
    """An instance of ``spec`` from command-line arguments (exits with usage on bad input)."""
    arguments = argument_parser(spec, description or spec.__doc__.splitlines()[0]).parse_args(argv)
    return spec(**vars(arguments))


def mlproject_entry_point(entry_point: str, spec: type) -> dict[str, Any]:
    """The MLproject entry point of a step: its parameters and command."""
    parameters: dict[str, dict[str, Any]] = {}
    for field in fields_of(spec):
        codec = codec_of(spec, field)
        declared: dict[str, Any] = {"type": codec.mlproject_type}
        if (default := default_of(field)) is not dataclasses.MISSING:
            declared["default"] = _YAML_SCALAR[codec.mlproject_type](codec.to_text(default))
        parameters[field.name] = declared
    command = " ".join(
        [
            f"python -m steps.{entry_point}",
            *(f"{_flag(f.name)} {{{f.name}}}" for f in fields_of(spec)),
        ]
    )
    return {"parameters": parameters, "command": command}


def config_schema_fields(spec: type) -> list[tuple[str, Any, dataclasses.Field]]:
    """``(name, type, field)`` triples for ``dataclasses.make_dataclass``: the schema of the
    step's conf/ section, one key per ``config`` field, with the spec's default (``???`` for a
    required one)."""
    schema = []
    for field in fields_of(spec, ROLE_CONFIG):
        codec = codec_of(spec, field)
        default = default_of(field)
        if default is dataclasses.MISSING:
            schema.append((field.name, codec.config_type, dataclasses.field(default=MISSING)))
            continue
        value = codec.to_config(default)
        if isinstance(value, list | dict):
            default_field = dataclasses.field(default_factory=lambda value=value: value.copy())
        else:
            default_field = dataclasses.field(default=value)
        schema.append((field.name, codec.config_type, default_field))
    return schema


def config_values(spec: type, section: Mapping[str, Any]) -> dict[str, Any]:
    """The ``config`` fields' values from a composed conf/ section, by field name."""
    return {
        field.name: codec_of(spec, field).from_config(section[field.name])
        for field in fields_of(spec, ROLE_CONFIG)
    }


def _config_text(value: Any) -> str:
    """A conf/ value as it is written in YAML (flow style)."""
    if isinstance(value, Enum):
        return value.value
    if dataclasses.is_dataclass(value):
        value = {key: _config_text(item) for key, item in vars(value).items()}
    if isinstance(value, dict):
        value = {key: _config_text(item) if isinstance(item, Enum) or dataclasses.is_dataclass(item)
                 else item for key, item in value.items()}  # fmt: skip
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...")\
        .strip()  # fmt: skip


def markdown_rows(spec: type, section: str | None) -> list[str]:
    """Table rows ``| key | type | default | meaning |`` (docs/configuration.md) for a spec's
    parameters: for ``config`` fields the conf/ key and its YAML form, for the others the step
    parameter."""
    rows = []
    for field in fields_of(spec):
        codec = codec_of(spec, field)
        default = default_of(field)
        in_config = field.metadata["role"] == ROLE_CONFIG and section is not None
        if in_config:
            key = f"`{section}.{field.name}`"
            origin = typing.get_origin(codec.config_type) or codec.config_type
            kind = {list: "list", dict: "mapping", bool: "true/false"}.get(origin, "")
            kind = kind or codec.expects or codec.mlproject_type
        else:
            key = f"`{field.name}` (set by main)" if section else f"`{field.name}`"
            kind = codec.expects or codec.mlproject_type
        if default is dataclasses.MISSING:
            shown = "required"
        else:
            text = _config_text(codec.to_config(default)) if in_config else codec.to_text(default)
            shown = f"`{text}`" if text not in ("", "''") else '`""`'
        rows.append(f"| {key} | {kind} | {shown} | {field.metadata['help']} |")
    return rows
