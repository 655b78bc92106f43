"""Configs in and out as YAML: presets by name or file, `--set a.b=value` overrides, a run's config.yaml.

A preset is a YAML file with a `stage:` key (vae | dit | decoder) and one mapping per section of
that stage's dataclass (config.py). Unknown keys and ill-typed values are one-line errors. The fully
resolved config is written as config.yaml into every run dir.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import fields, is_dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from flatdino_cli.config import STAGES
from flatdino_cli.errors import UserError
from flatdino_cli.utils import atomic_write_text

PRESET_DIR = Path(__file__).resolve().parent.parent / "presets"


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and gently convert) a YAML value against a dataclass field type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"config: {key} has a bad value {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:  # tuple[str, ...]: a list of any length
            if not isinstance(value, (list, tuple)):
                raise UserError(f"config: {key} must be a list, got {value!r}")
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise UserError(f"config: {key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if is_dataclass(tp):
        if not isinstance(value, dict):
            raise UserError(f"config: {key} must be a mapping, got {value!r}")
        return _from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    name = getattr(tp, "__name__", str(tp))
    raise UserError(f"config: {key} must be {name}, got {value!r}")


def _unknown_key(key: str, valid: list[str]) -> UserError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], valid, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else f" (valid: {', '.join(valid)})"
    return UserError(f"config: unknown key '{key}'{hint}")


def _from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    types_ = _field_types(cls)
    kwargs = {}
    for k, v in data.items():
        if k not in types_:
            raise _unknown_key(prefix + k, list(types_))
        kwargs[k] = _coerce(v, types_[k], prefix + k)
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise UserError(f"config: {prefix or cls.__name__}: {e}") from None


def to_dict(cfg: Any) -> dict:
    """Plain dict (tuples as lists) for YAML/JSON."""

    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def config_from_dict(data: dict, source: str = "config") -> Any:
    if not isinstance(data, dict) or "stage" not in data:
        raise UserError(f"{source}: not a flatdino config (it needs a top-level 'stage:' key)")
    stage = data["stage"]
    if stage not in STAGES:
        raise UserError(f"{source}: unknown stage '{stage}' (valid: {', '.join(STAGES)})")
    return _from_dict(STAGES[stage], data)


def load_yaml(path: Path) -> Any:
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise yaml_error(e, str(path)) from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None


def _preset_files() -> dict[str, Any]:
    """Preset name -> file, from the wheel's flatdino_cli.presets (or the source tree's presets/)."""
    out: dict[str, Any] = {}
    try:
        root = resources.files("flatdino_cli.presets")
        for entry in root.iterdir():
            if entry.name.endswith(".yaml"):
                out[entry.name[:-5]] = entry
    except (ModuleNotFoundError, FileNotFoundError):
        pass
    if not out and PRESET_DIR.is_dir():
        out = {p.stem: p for p in PRESET_DIR.glob("*.yaml")}
    return out


def list_presets() -> list[str]:
    return sorted(_preset_files())


def load_preset(name: str, overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """A preset by name (`vae-32x128`) or path (`my.yaml`), with `a.b=value` overrides applied."""
    files = _preset_files()
    if name in files:
        text = files[name].read_text()
        source = f"preset {name}"
    elif name.endswith((".yaml", ".yml")) or Path(name).is_file():
        path = Path(name)
        if not path.is_file():
            raise UserError(f"--preset {name}: file not found")
        text = path.read_text()
        source = str(path)
    else:
        close = difflib.get_close_matches(name, list(files), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "run `flatdino presets` to list them"
        raise UserError(f"--preset {name}: no such preset ({hint})")
    data = _parse_preset(text, source)
    seen = {name}
    while isinstance(data, dict) and "base" in data:  # a preset may extend another one
        base = data.pop("base")
        if base in seen or base not in files:
            raise UserError(f"{source}: base preset '{base}' is unknown or circular")
        seen.add(base)
        data = _merge(_parse_preset(files[base].read_text(), f"preset {base}"), data)
    cfg = config_from_dict(data, source)
    return apply_overrides(cfg, overrides)


def _parse_preset(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise yaml_error(e, source) from None


def yaml_error(e: yaml.YAMLError, source: str) -> UserError:
    """One line: the YAML problem and its line; python/object tags are named as refused on purpose."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    where = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    if isinstance(e, yaml.constructor.ConstructorError) and "tag" in problem:
        return UserError(f"{source}:{where}: {problem}: python tags are refused (plain YAML only)")
    context = getattr(e, "context", None)
    return UserError(f"{source}:{where}: invalid YAML: {context + ', ' if context else ''}{problem}")


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def apply_overrides(cfg: Any, overrides: list[str] | tuple[str, ...]) -> Any:
    """Apply `--set a.b=value` strings; values are parsed as YAML scalars and type-checked."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item}: expected key=value, e.g. --set train.lr=1e-4")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str) and _looks_numeric(value):
            value = float(value)  # YAML 1.1 reads "1e-4" as a string
        cfg = _set_path(cfg, key.split("."), value, key)
    return cfg


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _set_path(obj: Any, parts: list[str], value: Any, full: str) -> Any:
    types_ = _field_types(type(obj))
    head = parts[0]
    if head not in types_:
        raise _unknown_key(full, list(types_))
    if len(parts) == 1:
        if head == "stage":
            raise UserError("--set stage=...: the stage comes from the preset; pick another --preset")
        return replace(obj, **{head: _coerce(value, types_[head], full)})
    child = getattr(obj, head)
    if not is_dataclass(child):
        raise UserError(f"--set {full}: '{head}' has no sub-keys")
    return replace(obj, **{head: _set_path(child, parts[1:], value, full)})


def save_config(cfg: Any, path: Path) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_text(Path(path), yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_config(path: Path) -> Any:
    return config_from_dict(load_yaml(Path(path)), str(path))
