"""Load a YAML recipe: ``base_config:`` inheritance, mindformers' ``model_config`` form, ``a.b=c`` overrides."""
from __future__ import annotations

import copy
import os
import re
import typing
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from .core import ConfigError, Section, build_section, field_names
from .schema import ModelConfig, TrainConfig

_KEY_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def _read_yaml(path: str) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """Parse one YAML file safely; return (mapping, {dotted key path: 'file:line'})."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as e:
        raise ConfigError("<file>", f"cannot read config file: {e.strerror}", value=path) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else path
        raise ConfigError("<file>", f"not valid YAML: {getattr(e, 'problem', e)}", where=where) from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError("<root>", "a config file must be a mapping of sections", value=type(data).__name__,
                          where=path)
    origins: Dict[str, str] = {}

    def walk(n, prefix):
        if isinstance(n, yaml.MappingNode):
            seen = set()
            for k, v in n.value:
                key = f"{prefix}.{k.value}" if prefix else str(k.value)
                where = f"{path}:{k.start_mark.line + 1}"
                if key in seen:
                    raise ConfigError(key, "key appears twice in the same mapping", where=where)
                seen.add(key)
                origins[key] = where
                walk(v, key)

    walk(node, "")
    return data, origins


def _normalise_mindformers(data: Dict[str, Any], origins: Dict[str, str]) -> None:
    """Accept mindformers' ``model: {model_config: {...}, arch: {type: X}}`` as our flat ``model:``."""
    model = data.get("model")
    if not isinstance(model, dict):
        return
    flat = {}
    if isinstance(model.get("model_config"), dict):
        inner = model.pop("model_config")
        if isinstance(inner.get("type"), str) and inner["type"].endswith("Config"):
            inner.pop("type")  # a mindformers config class name, not our architecture
        for k, v in inner.items():
            flat[k] = v
            if f"model.model_config.{k}" in origins:
                origins[f"model.{k}"] = origins[f"model.model_config.{k}"]
    arch = model.pop("arch", None)
    if isinstance(arch, dict) and "type" in arch:
        flat["type"] = arch["type"]
        origins.setdefault("model.type", origins.get("model.arch.type", ""))
    elif arch is not None:
        flat["type"] = arch
    flat.update(model)  # keys written directly under model win
    data["model"] = flat


def _section_type(cls: type, name: str) -> Optional[type]:
    hints = typing.get_type_hints(cls)
    tp = hints.get(name)
    return tp if isinstance(tp, type) and issubclass(tp, Section) else None


def canonicalize(cls: type, data: Dict[str, Any], prefix: str, origins: Dict[str, str]) -> Dict[str, Any]:
    """Rename aliases to canonical keys (recursively), so files and overrides merge on one spelling.

    Unknown keys are kept as they are; building the section reports them with a suggestion.
    """
    if not isinstance(data, dict):
        return data
    spellings = field_names(cls)
    out: Dict[str, Any] = {}
    spelled: Dict[str, str] = {}
    for key, value in data.items():
        src = f"{prefix}.{key}" if prefix else str(key)
        target = spellings.get(key, key)
        parts = target.split(".")
        dst = f"{prefix}.{target}" if prefix else target
        if dst in spelled:
            raise ConfigError(src, f"given twice, also as '{spelled[dst]}'", where=origins.get(src, ""))
        spelled[dst] = str(key)
        if src in origins and dst != src:
            origins[dst] = origins[src]
        holder, owner = out, cls
        for part in parts[:-1]:
            holder = holder.setdefault(part, {})
            owner = _section_type(owner, part) or owner
        sub = _section_type(owner, parts[-1])
        if sub is not None and isinstance(value, dict):
            value = canonicalize(sub, value, dst, origins)
            if isinstance(holder.get(parts[-1]), dict):
                merged = holder[parts[-1]]
                for k in value:
                    if k in merged:
                        raise ConfigError(f"{dst}.{k}", "given twice (flat alias and nested key)",
                                          where=origins.get(f"{dst}.{k}", ""))
                merged.update(value)
                continue
        holder[parts[-1]] = value
    return out


def _deep_merge(base: Dict[str, Any], top: Dict[str, Any]) -> Dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _load_tree(path: str, chain: Tuple[str, ...]) -> Tuple[Dict[str, Any], Dict[str, str]]:
    path = os.path.abspath(path)
    if path in chain:
        raise ConfigError("base_config", "inheritance cycle: " + " -> ".join(chain + (path,)), where=path)
    data, origins = _read_yaml(path)
    bases = data.pop("base_config", None)
    where = origins.get("base_config", path)
    _normalise_mindformers(data, origins)
    data = canonicalize(TrainConfig, data, "", origins)
    merged: Dict[str, Any] = {}
    merged_origins: Dict[str, str] = {}
    if bases is not None:
        if isinstance(bases, str):
            bases = [bases]
        if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
            raise ConfigError("base_config", "expected a file path or a list of paths", value=bases, where=where)
        for base in bases:
            base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
            if not os.path.isfile(base_path):
                raise ConfigError("base_config", "base config file not found", value=base, where=where,
                                  allowed="a path relative to the including file")
            b_data, b_origins = _load_tree(base_path, chain + (path,))
            merged = _deep_merge(merged, b_data)
            merged_origins.update(b_origins)
    merged = _deep_merge(merged, data)
    merged_origins.update(origins)
    return merged, merged_origins


def parse_override(text: str) -> Tuple[str, Any]:
    """``"a.b=c"`` -> ("a.b", parsed YAML value of c)."""
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError("<override>", "an override must look like key.path=value", value=text)
    key, raw = text.split("=", 1)
    key = key.strip()
    if not _KEY_PATH.match(key):
        raise ConfigError("<override>", "bad key path in override", value=text,
                          allowed="dotted names such as model.num_layers=4")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        raise ConfigError(key, "cannot parse the override value as YAML", value=raw,
                          where=f"override '{text}'") from None
    return key, value


def _apply_override(data: Dict[str, Any], key: str, value: Any, origins: Dict[str, str], text: str) -> None:
    # Resolve aliases along the path through the schema, so overrides merge on canonical names.
    parts = key.split(".")
    if parts[:2] == ["model", "model_config"]:
        parts = ["model"] + parts[2:]
    if parts and parts[0] == "model" and len(parts) > 1 and parts[1] == "arch":
        parts = ["model", "type"]
    cls, resolved = TrainConfig, []
    for part in parts:
        target = field_names(cls).get(part, part) if cls is not None else part
        resolved.extend(target.split("."))
        if cls is not None:
            for seg in target.split("."):
                cls = _section_type(cls, seg) if cls is not None else None
    holder = data
    for i, part in enumerate(resolved[:-1]):
        nxt = holder.get(part)
        if nxt is None:
            nxt = holder[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(".".join(resolved[: i + 1]), "is a value, not a section, so it has no sub-keys",
                              value=nxt, where=f"override '{text}'")
        holder = nxt
    holder[resolved[-1]] = value
    origins[".".join(resolved)] = f"override '{text}'"


def load_config(path: str, overrides: Sequence[str] = ()) -> TrainConfig:
    """Load a YAML recipe (with ``base_config:`` inheritance) and apply ``a.b=c`` overrides.

    Every bad input raises one :class:`ConfigError` naming the key path, the value, where it came from and
    what is allowed.
    """
    data, origins = _load_tree(path, ())
    for text in overrides or ():
        key, value = parse_override(text)
        _apply_override(data, key, value, origins, text)
    cfg = build_section(TrainConfig, data, "", origins)
    cfg.source = os.path.abspath(path)
    return cfg


def model_config_from_dict(data: Dict[str, Any], *, strict: bool = True,
                           ignored: Optional[List[str]] = None) -> ModelConfig:
    """Build a ModelConfig from a flat or nested dict (e.g. a Hugging Face config.json's keys)."""
    origins: Dict[str, str] = {}
    data = canonicalize(ModelConfig, copy.deepcopy(data), "model", origins)
    return build_section(ModelConfig, data, "model", origins, strict=strict, ignored=ignored)

