"""Load a run's config: a YAML file (optionally extending another) plus dotted `key=value`
overrides, validated into a typed pydantic model.

Errors are written for people: an unknown key names the key, the file it came from and the
closest valid key; a bad value names the key and what was expected.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from rmr1_ray.config.sections import Strict

T = TypeVar("T", bound=BaseModel)

EXTENDS_KEY = "extends"


class ConfigError(ValueError):
    """A config that cannot be used; the message says which key and why."""


def read_yaml_tree(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML file; `extends: other.yaml` (relative to the file) is merged underneath it."""
    path = path.resolve()
    if path in _seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle: {' -> '.join(map(str, _seen + (path,)))}")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(data).__name__}")
    base_name = data.pop(EXTENDS_KEY, None)
    if base_name is None:
        return data
    base = read_yaml_tree(path.parent / base_name, _seen + (path,))
    return deep_merge(base, data)


def deep_merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides; values are parsed as YAML scalars/lists (`x=[1,2]`, `y=null`)."""
    tree = dict(tree)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. trainer.total_steps=2)")
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = tree
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[parts[-1]] = value
    return tree


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at `loc` (for 'did you mean' suggestions)."""
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return None
        field = current.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            # list index or dict key: step into the element type
            args = getattr(current, "__args__", ())
            current = args[-1] if args else None
            continue
        current = _unwrap(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(annotation: Any) -> Any:
    """Strip Optional[...] / list[...] / dict[..., X] down to a pydantic model class if there is one."""
    for arg in getattr(annotation, "__args__", ()) or ():
        inner = _unwrap(arg)
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            return inner
    return annotation


def describe_errors(exc: ValidationError, model: type[BaseModel], source: str) -> str:
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        dotted = ".".join(str(p) for p in loc) or "<top level>"
        if err["type"] == "extra_forbidden":
            parent = _model_at(model, loc[:-1])
            valid = sorted(parent.model_fields) if parent else []
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f"; did you mean '{'.'.join([*map(str, loc[:-1]), close[0]])}'?" if close else ""
            known = f" Valid keys here: {', '.join(valid)}." if valid else ""
            lines.append(f"unknown key '{dotted}' in {source}{hint}{known}")
        elif err["type"] == "value_error":
            where = f" at '{dotted}'" if loc else ""
            lines.append(f"invalid config{where} in {source}: {err['msg'].removeprefix('Value error, ')}")
        elif err["type"] == "missing":
            lines.append(f"missing required key '{dotted}' in {source}")
        else:
            lines.append(f"bad value for '{dotted}' in {source}: {err['msg']} (got {err.get('input')!r})")
    return "\n".join(lines)


def load_config(model: type[T], path: str | Path | None, overrides: list[str] | None = None) -> T:
    """Build a validated config of type `model` from a YAML file and overrides."""
    overrides = overrides or []
    tree = read_yaml_tree(Path(path)) if path else {}
    tree = apply_overrides(tree, overrides)
    source = f"{path}" if path else "the command line"
    if overrides:
        source += f" (with overrides {' '.join(overrides)})"
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(describe_errors(exc, model, source)) from None


def save_resolved(config: BaseModel, directory: str | Path, name: str = "config.resolved.yaml") -> Path:
    """Write the fully resolved config next to a run's outputs (the single source of truth)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / name
    out.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    return out


__all__ = ["ConfigError", "Strict", "apply_overrides", "load_config", "read_yaml_tree", "save_resolved"]
