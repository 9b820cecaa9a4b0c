"""Config loading shared by the jobs: dataclass tree defaults <- YAML preset <- ``--set a.b=c`` overrides.

    cfg = load_config(PreprocessConfig, preset="demo", overrides=["write.rows_per_shard=8"],
                      presets_dir=CONFIGS, prefix="preprocess_")
    print(dump_yaml(cfg))

- A preset is ``jobs/configs/<prefix><name>.yaml`` or a path to any YAML file. A preset may name another
  one under the key ``base:`` (merged first, recursively).
- Overrides are ``dotted.key=value`` strings (the value parsed as YAML: ``8``, ``true``, ``null``, ``[a, b]``,
  ``{x: 1}``), or ``(dotted.key, value)`` pairs whose value is used as given (no quoting needed for code
  that builds overrides); either way the value is then checked against the dataclass field's type. ``dict[str, Dataclass]`` fields take new
  keys (``resources.render.num_gpus=1``).
- Unknown keys are errors that list the valid ones: a typo never silently falls back to a default. A caller
  that reads only its own part of a shared preset names the other parts' top-level sections (``other_layers``).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

T = TypeVar("T")

# The presets shipped with the project: YAML data read from the repository, not code imported from jobs/.
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "jobs" / "configs"


class ConfigError(ValueError):
    """A preset or override that does not fit the config tree."""


# ----------------------------------------------------------------------------------------------- loading


def load_config(
    cls: type[T],
    preset: str | Path | None = None,
    overrides: "Sequence[str | tuple[str, Any]]" = (),
    *,
    presets_dir: str | Path = CONFIGS_DIR,
    prefix: str = "",
    other_layers: Sequence[str] = (),
) -> T:
    """Defaults of ``cls`` <- preset YAML <- overrides, type-checked.

    ``other_layers`` names top-level sections that a preset may hold for another layer of the same job (a trainer's
    config read from a preset that also configures the Ray job around it): they are left out unread. Every other
    key that is not a field of ``cls`` is still an error."""
    clash = sorted(set(other_layers) & {f.name for f in dataclasses.fields(cls)})  # type: ignore[arg-type]
    if clash:
        raise ValueError(f"other_layers {clash} are fields of {cls.__name__}")
    data: dict[str, Any] = {}
    if preset:
        data = load_preset(preset, presets_dir=presets_dir, prefix=prefix)
    for ov in overrides:
        key, value = ov if isinstance(ov, tuple) else parse_override(ov)
        set_dotted(data, key, value)
    for name in other_layers:
        data.pop(name, None)
    return from_dict(cls, data)


def preset_path(name: str | Path, presets_dir: str | Path = CONFIGS_DIR, prefix: str = "") -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    cand = Path(presets_dir) / f"{prefix}{name}.yaml"
    if cand.exists():
        return cand
    known = sorted(x.stem[len(prefix):] for x in Path(presets_dir).glob(f"{prefix}*.yaml"))
    raise ConfigError(f"unknown preset {str(name)!r}; known presets: {', '.join(known) or '(none)'}")


def load_preset(name: str | Path, presets_dir: str | Path = CONFIGS_DIR, prefix: str = "",
                _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = preset_path(name, presets_dir, prefix).resolve()
    if path in _seen:
        raise ConfigError(f"preset inheritance loop: {' -> '.join(str(s) for s in _seen + (path,))}")
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a preset must be a mapping, got {type(data).__name__}")
    base = data.pop("base", None)
    if base:
        merged = load_preset(base, presets_dir, prefix, _seen + (path,))
        deep_merge(merged, data)
        data = merged
    return data


def deep_merge(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            deep_merge(dst[k], v)
        else:
            dst[k] = v
    return dst


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw  # not YAML: keep the literal string
    return key, value


def set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    cur = data
    for p in parts[:-1]:
        nxt = cur.get(p)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[p] = nxt
        cur = nxt
    cur[parts[-1]] = value


# ------------------------------------------------------------------------------------ dict <-> dataclass


def from_dict(cls: type[T], data: dict[str, Any] | None, path: str = "") -> T:
    """Build dataclass ``cls`` from ``data`` (missing keys keep their defaults)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path or '<root>'}: expected a mapping for {cls.__name__}, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        k = unknown[0]
        close = difflib.get_close_matches(k, fields, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown config key {_join(path, k)!r}{hint}; valid keys: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name not in data:
            continue
        tp = hints[name]
        value = data[name]
        # A dataclass-valued field given as a partial mapping merges onto that field's default.
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            kwargs[name] = from_dict(tp, value, _join(path, name))
            continue
        if _is_dict_of_dataclass(tp) and isinstance(value, dict):
            default = _field_default(f)
            merged = dict(default or {})
            vt = typing.get_args(tp)[1]
            for k, v in value.items():
                if isinstance(v, dict) and k in merged and dataclasses.is_dataclass(merged[k]):
                    base = to_dict(merged[k])
                    deep_merge(base, v)
                    v = base
                merged[k] = _coerce(v, vt, _join(path, f"{name}.{k}"))
            kwargs[name] = merged
            continue
        kwargs[name] = _coerce(value, tp, _join(path, name))
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Dataclass tree -> plain dicts/lists (YAML/JSON-safe)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=False)


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None


def _is_dict_of_dataclass(tp: Any) -> bool:
    if typing.get_origin(tp) is not dict:
        return False
    args = typing.get_args(tp)
    return len(args) == 2 and dataclasses.is_dataclass(args[1])


def _coerce(value: Any, tp: Any, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{path}: cannot use {value!r}")
    if value is None:
        raise ConfigError(f"{path}: null is not allowed here (type {_tname(tp)})")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, path)
    if origin in (list, tuple):
        if isinstance(value, str):
            # "--set sources.specs=synthetic:4" -> one-element list; "a,b" stays one element on purpose.
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        et = args[0] if args else Any
        out = [_coerce(v, et, f"{path}[{i}]") for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_coerce(k, kt, path): _coerce(v, vt, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        raise ConfigError(f"{path}: expected a bool, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected an int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected an int, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{path}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value if isinstance(value, str) else str(value)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{path}: cannot use {value!r} as {_tname(tp)}")


def _tname(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp)


# ----------------------------------------------------------------------------------------------- argparse


def add_config_args(parser: argparse.ArgumentParser, default_preset: str | None = None) -> None:
    parser.add_argument("--preset", default=default_preset,
                        help="preset name (jobs/configs/<job>_<NAME>.yaml) or a path to a YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config value, e.g. --set write.rows_per_shard=8 (repeatable)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
