"""What a command's configuration holds, read from its dataclass schema: every key with
its type, default and description, for `dlm <command> --help`, shell completion and the
"did you mean" answer to a misspelt key or group.

A key's description is the comment of its dataclass field (one source of truth): the
comment on the field's own lines, else the comment block directly above the field. Its
first line is the one shown in --help.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import io
import re
import textwrap
import tokenize
import typing
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from omegaconf import MISSING

from parallel.topology import ConfigError


@dataclass(frozen=True)
class KeyDoc:
    key: str  # dotted path, e.g. train.steps
    type: str  # as annotated, e.g. int | None
    default: str  # the composed default, YAML-style (null, required, [a, b])
    doc: str  # the field's description, first line first


@cache
def field_docs(cls: type) -> dict[str, str]:
    """{field name: description} from the comments in a dataclass's source."""
    source = textwrap.dedent(inspect.getsource(cls))
    lines = source.splitlines()
    comments = {
        token.start[0]: token.string.lstrip("#").strip()
        for token in tokenize.generate_tokens(io.StringIO(source).readline)
        if token.type == tokenize.COMMENT
    }
    docs = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            own = [comments[n] for n in range(node.lineno, node.end_lineno + 1) if n in comments]
            docs[node.target.id] = "\n".join(own or _comment_block_above(lines, comments, node.lineno))
    return docs


def _comment_block_above(lines: list[str], comments: dict[int, str], lineno: int) -> list[str]:
    block, number = [], lineno - 1
    while number in comments and lines[number - 1].lstrip().startswith("#"):
        block.insert(0, comments[number])
        number -= 1
    return block


def type_name(hint) -> str:
    """`int | None`, `list[str]`, `list[SourceConfig]`: module paths dropped."""
    text = hint.__name__ if isinstance(hint, type) else str(hint)
    return re.sub(r"[\w.]+\.(\w+)", r"\1", text).replace("NoneType", "None")


def is_schema(hint) -> bool:
    return isinstance(hint, type) and dataclasses.is_dataclass(hint)


def schema_fields(schema: type) -> dict[str, object]:
    """{field: type hint} of a dataclass, in declaration order."""
    hints = typing.get_type_hints(schema)
    return {f.name: hints[f.name] for f in dataclasses.fields(schema)}


def key_docs(schema: type, defaults) -> list[KeyDoc]:
    """Every key of `schema`: its sections' fields one level down (model.hidden_size),
    the rest as they are (curriculum.t_min is one Schedule-valued key). `defaults` is the
    composed default config (a DictConfig), whose values, interpolations unresolved, are
    shown as the defaults."""
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(defaults, resolve=False)
    keys = []
    for name, hint in schema_fields(schema).items():
        if is_schema(hint):
            for sub, sub_hint in schema_fields(hint).items():
                default = _shown(values.get(name, {}).get(sub))
                keys.append(
                    KeyDoc(f"{name}.{sub}", type_name(sub_hint), default, field_docs(hint).get(sub, ""))
                )
        else:
            doc = field_docs(schema).get(name, "")
            keys.append(KeyDoc(name, type_name(hint), _shown(values.get(name)), doc))
    return keys


def _shown(value) -> str:
    if isinstance(value, dict) and list(value) == ["values", "at", "interp"] and len(value["values"]) == 1:
        value = value["values"][0]  # a constant Schedule
    return _yaml_value(value)


def _yaml_value(value) -> str:
    if value is None:
        return "null"
    if value == MISSING:
        return "required"
    if value == "":
        return '""'
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(_yaml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_yaml_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def hydra_quote(value: str) -> str:
    """A value for Hydra's override grammar: quoted unless a plain path."""
    if all(ch.isalnum() or ch in "/._-~+" for ch in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


# -- groups ----------------------------------------------------------------------------------------
def group_options(conf_dir: Path, groups: tuple[str, ...]) -> dict[str, list[str]]:
    """{group: its options}, the YAML files of conf/<group>/."""
    return {group: sorted(p.stem for p in (conf_dir / group).glob("*.yaml")) for group in groups}


# -- checking overrides ----------------------------------------------------------------------------
def check_overrides(overrides: list[str], schema: type, options: dict[str, list[str]], extra=()) -> None:
    """Raise ConfigError for an override naming no key of `schema`, no group of `options`
    or no option of its group, with the closest valid names. `extra`: more accepted keys
    (a command's own, such as eval's checkpoint). A +key must name a key of the schema
    too (the typed config would drop it silently); hydra.* keys are Hydra's to check."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if key.startswith("hydra") or key in extra:
            continue  # Hydra checks its own keys
        if key in options:
            if not override.is_delete():
                _check_option(key, _values(override), options[key])
        else:
            hint = _check_key(key, schema, options)
            if is_schema(hint) and not override.is_delete() and not isinstance(override.value(), dict):
                fields = ", ".join(f"{key}.{name}" for name in schema_fields(hint))
                raise ConfigError(f"`{key}` is a section: set its keys ({fields})")


def _values(override) -> list[str]:
    if override.is_sweep_override():
        return list(override.sweep_string_iterator())
    value = override.value()
    return [] if value is None else [override.get_value_element_as_str()]


def _check_option(group: str, values: list[str], choices: list[str]) -> None:
    for value in values:
        if value not in choices and value != "null":
            raise ConfigError(
                f"`{group}={value}`: no such option in conf/{group}/ ({', '.join(choices)})"
                + did_you_mean(value, choices, f"{group}=")
            )


def _check_key(key: str, schema: type, options: dict[str, list[str]]):
    """The type hint of `key` (None below a dict or list value), or ConfigError."""
    hint: object = schema
    for depth, part in enumerate(key.split(".")):
        if not is_schema(hint):
            return None  # a dict, list or Any value: anything goes below it
        fields = schema_fields(hint)
        if part not in fields:
            known = [k for k in all_keys(schema) if not is_schema(key_type(schema, k))] + list(options)
            where = ".".join(key.split(".")[:depth])
            siblings = [f"{where}.{name}" if where else name for name in fields]
            raise ConfigError(f"`{key}`: no such key" + did_you_mean(key, siblings + known))
        hint = fields[part]
    return hint


def key_type(schema: type, key: str):
    hint = schema
    for part in key.split("."):
        hint = schema_fields(hint)[part]
    return hint


def all_keys(schema: type) -> list[str]:
    """Every dotted key down to the leaves of nested schemas."""
    keys = []
    for name, hint in schema_fields(schema).items():
        keys.append(name)
        if is_schema(hint):
            keys += [f"{name}.{sub}" for sub in all_keys(hint)]
    return keys


def did_you_mean(given: str, candidates: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(given, list(dict.fromkeys(candidates)), n=3, cutoff=0.6)
    if not close:
        return ""
    return "; did you mean " + " or ".join(f"`{prefix}{name}`" for name in close) + "?"
