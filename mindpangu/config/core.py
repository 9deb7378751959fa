"""The typed-config engine: declared fields, aliases, coercion and errors that point at the YAML line.

Every config section is a dataclass whose fields are declared with :func:`option`. The engine turns a plain
dict (from YAML, an override list or a Hugging Face ``config.json``) into that dataclass, and every mistake
becomes one :class:`ConfigError` naming the key path, the bad value, where it came from and what is allowed.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from typing import Any, Dict, Optional, Tuple

_MISSING = dataclasses.MISSING


class ConfigError(ValueError):
    """A bad configuration value: names the key path, the value, its origin and what is allowed."""

    def __init__(self, key: str, problem: str, *, value: Any = _MISSING, allowed: str = "", where: str = ""):
        self.key, self.problem, self.value, self.allowed, self.where = key, problem, value, allowed, where
        text = f"config error at '{key}'"
        if where:
            text += f" ({where})"
        text += f": {problem}"
        if value is not _MISSING:
            text += f" (got {value!r})"
        if allowed:
            text += f"; allowed: {allowed}"
        super().__init__(text)


def option(default: Any = _MISSING, doc: str = "", *, choices: Optional[Tuple] = None, ge: Any = None,
           gt: Any = None, le: Any = None, aliases: Tuple[str, ...] = (),
           value_aliases: Optional[Dict[Any, Any]] = None, path: bool = False, finite: bool = True) -> Any:
    """Declare a config field: its default, what it means, and the values allowed.

    ``aliases`` are other spellings of the key; ``value_aliases`` map other spellings of a value to the canonical
    one (e.g. a mindformers class name to an architecture name). ``path=True`` marks a file path: a relative
    path written in a YAML file is taken relative to that file. Every number in a field (lists included) must be
    finite (YAML's ``.nan`` / ``.inf`` are refused) unless ``finite=False``.
    """
    meta = {"doc": doc, "choices": choices, "ge": ge, "gt": gt, "le": le, "aliases": tuple(aliases),
            "value_aliases": value_aliases or {}, "path": path, "finite": finite}
    if dataclasses.is_dataclass(default) or isinstance(default, (list, dict)):
        factory = (lambda d=default: dataclasses.replace(d)) if dataclasses.is_dataclass(default) \
            else (lambda d=default: type(d)(d))
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class Section:
    """Base of every config section. Subclasses are dataclasses.

    ``HOISTED`` maps a flat alias accepted in this section to a dotted path inside a nested section, so a flat
    Hugging Face style ``n_routed_experts`` lands in ``moe.num_experts``.
    """

    HOISTED: Dict[str, str] = {}

    def validate(self, path: str, origins: Dict[str, str]) -> None:
        """Cross-field checks; raise ConfigError. Field-level checks are done by the engine."""

    def to_dict(self) -> Dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if isinstance(v, Section) else v
        return out


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(tp: Any, value: Any, key: str, where: str) -> Any:
    """Convert a YAML value to the declared type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arg in typing.get_args(tp):
            try:
                return _coerce(arg, value, key, where)
            except ConfigError as e:
                errors.append(e)
        raise ConfigError(key, f"expected {_type_name(tp)}", value=value, where=where)
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(key, "expected null", value=value, where=where)
    if tp is Any:
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected {_type_name(tp)}", value=value, where=where)
        (arg,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(arg, v, f"{key}[{i}]", where) for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(key, "expected a boolean (true/false)", value=value, where=where)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(key, "expected an integer", value=value, where=where)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(key, "expected a number", value=value, where=where)
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(key, "expected a string", value=value, where=where)
    if isinstance(tp, type) and issubclass(tp, Section):
        raise AssertionError("nested sections are built by build_section")
    return value


def field_names(cls: type) -> Dict[str, str]:
    """Every accepted spelling in a section -> its canonical field name (or dotted hoisted path)."""
    names = {}
    for f in dataclasses.fields(cls):
        names[f.name] = f.name
        for a in f.metadata.get("aliases", ()):
            names[a] = f.name
    names.update(cls.HOISTED)
    return names


def _suggest(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=3, cutoff=0.6)
    return f"did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def build_section(cls: type, data: Any, path: str, origins: Dict[str, str], *, strict: bool = True,
                  ignored: Optional[list] = None) -> Any:
    """Build section ``cls`` from ``data`` (a dict). ``path`` is the dotted key path of the section.

    ``origins`` maps dotted key paths to "file:line" strings for error messages. With ``strict=False`` unknown
    keys are collected into ``ignored`` instead of raising (used for foreign files such as HF config.json).
    """
    where = origins.get(path, "")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path or "<root>", "expected a mapping of keys", value=data, where=where)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    spellings = field_names(cls)
    values: Dict[str, Any] = {}
    nested: Dict[str, Dict[str, Any]] = {}
    seen_from: Dict[str, str] = {}
    for raw_key, value in data.items():
        key = str(raw_key)
        kpath = f"{path}.{key}" if path else key
        kwhere = origins.get(kpath, where)
        if key not in spellings:
            if not strict:
                if ignored is not None:
                    ignored.append(kpath)
                continue
            hint = _suggest(key, spellings)
            allowed = ", ".join(sorted(fields))
            raise ConfigError(kpath, "unknown key" + (f"; {hint}" if hint else ""), where=kwhere,
                              allowed=allowed)
        target = spellings[key]
        if "." in target:  # hoisted alias into a nested section
            sub, subkey = target.split(".", 1)
            nested.setdefault(sub, {})[subkey] = value
            origins.setdefault(f"{path}.{sub}.{subkey}" if path else f"{sub}.{subkey}", kwhere)
            continue
        if target in seen_from:
            raise ConfigError(kpath, f"given twice, also as '{seen_from[target]}'", where=kwhere)
        seen_from[target] = key
        values[target] = (value, kpath, kwhere)
    built: Dict[str, Any] = {}
    for name, f in fields.items():
        tp = hints[name]
        fpath = f"{path}.{name}" if path else name
        if isinstance(tp, type) and issubclass(tp, Section):
            sub_data = {}
            if name in values:
                raw = values[name][0]
                if raw is not None and not isinstance(raw, dict):
                    raise ConfigError(fpath, "expected a mapping of keys", value=raw, where=values[name][2])
                sub_data.update(raw or {})
            for k, v in nested.get(name, {}).items():
                if k in sub_data:
                    raise ConfigError(f"{fpath}.{k}", "given twice (flat alias and nested key)",
                                      where=origins.get(f"{fpath}.{k}", ""))
                sub_data[k] = v
            built[name] = build_section(tp, sub_data, fpath, origins, strict=strict, ignored=ignored)
            continue
        if name not in values:
            if f.default is _MISSING and f.default_factory is _MISSING:
                raise ConfigError(fpath, "required key is missing", where=where)
            continue
        raw, kpath, kwhere = values[name]
        val = _coerce(tp, raw, kpath, kwhere)
        if isinstance(val, str):
            val = f.metadata.get("value_aliases", {}).get(val, val)
        if f.metadata.get("path") and isinstance(val, str):
            val = _relative_to_origin(val, kwhere)
        _check_bounds(f, val, kpath, kwhere)
        built[name] = val
    obj = cls(**built)
    obj.validate(path, origins)
    return obj


def _relative_to_origin(value: str, where: str) -> str:
    """A relative path from a YAML file ('file.yaml:12') is relative to that file's folder."""
    import os

    source = where.rsplit(":", 1)[0] if ":" in where else ""
    if value and not os.path.isabs(value) and source.endswith((".yaml", ".yml")) and value != "byte":
        return os.path.normpath(os.path.join(os.path.dirname(source), value))
    return value


def _non_finite(val: Any) -> bool:
    if isinstance(val, float):
        return not math.isfinite(val)
    return isinstance(val, (list, tuple)) and any(_non_finite(v) for v in val)


def _check_bounds(f: dataclasses.Field, val: Any, key: str, where: str) -> None:
    m = f.metadata
    if val is None:
        return
    if m.get("finite", True) and _non_finite(val):
        bounds = [f"{t} {m[b]}" for b, t in (("ge", ">="), ("gt", ">"), ("le", "<=")) if m.get(b) is not None]
        raise ConfigError(key, "must be finite (not NaN or infinity)", value=val, where=where,
                          allowed="a finite number" + (f" {' and '.join(bounds)}" if bounds else ""))
    if m.get("choices") is not None and val not in m["choices"]:
        raise ConfigError(key, "not an allowed value", value=val, where=where,
                          allowed=" | ".join(str(c) for c in m["choices"]))
    for bound, ok, text in (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
                            ("le", lambda v, b: v <= b, "<=")):
        b = m.get(bound)
        if b is not None and isinstance(val, (int, float)) and not ok(val, b):
            raise ConfigError(key, "out of range", value=val, where=where, allowed=f"a number {text} {b}")
