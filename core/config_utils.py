"""The one way a mapping becomes a config dataclass: an OmegaConf structured merge.

Every config of the project (the trainer's tree in rundir/schema.py, whose ``model`` section is
:class:`models.config.ModelConfig` with its typed ``moe`` and ``engram`` sections, and the sweep
families) is a dataclass. A YAML file, a Hydra composition or a plain dict is merged onto the
dataclass's structured config, which refuses an unknown key or a value of the wrong type (naming
the full key); ``OmegaConf.to_object`` then builds the dataclass, whose ``__post_init__`` checks the
values. Every failure is one :class:`ConfigError` line.
"""
from __future__ import annotations

import copy
import difflib
import json
import typing
from collections import OrderedDict
from dataclasses import fields, is_dataclass
from typing import Any, Optional, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A config key or value that would fail (or mislead) later: reported in one line before any compute."""


def _joined(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix and key else (prefix or key)


def _unknown_key_hint(cls: type, key: str, prefix: str) -> str:
    """``; did you mean train.max_steps?`` for the dataclass (nested in ``cls``) that lacks ``key``."""
    *path, last = key.split(".")
    node: Any = cls
    for part in path:
        node = _child_type(node, part)
    names = [f.name for f in fields(node)] if is_dataclass(node) else []
    near = difflib.get_close_matches(last, names, n=1, cutoff=0.75)
    if near:
        return f"; did you mean {_joined(prefix, '.'.join(path + [near[0]]))}?"
    return f" (known: {', '.join(names)})" if names else ""


def _child_type(kind: Any, part: str) -> Any:
    """The declared type under key ``part`` of ``kind`` (a dataclass field, Optional unwrapped, or a
    ``Dict[str, X]`` entry); None where the schema declares none."""
    if is_dataclass(kind):
        kind = typing.get_type_hints(kind).get(part)
    elif typing.get_origin(kind) is dict:
        return typing.get_args(kind)[1]
    else:
        return None
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if typing.get_origin(kind) is typing.Union and len(args) == 1 else kind


def _one_line(e: Exception, cls: type, prefix: str) -> ConfigError:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    key = getattr(e, "full_key", None) or ""
    first = lines[0] if lines else type(e).__name__
    if isinstance(e, ConfigKeyError) and key:
        return ConfigError(f"unknown config key {_joined(prefix, key)}{_unknown_key_hint(cls, key, prefix)}")
    if key:
        return ConfigError(f"config key {_joined(prefix, key)}: {first}")
    return ConfigError(f"{prefix}: {first}" if prefix and not first.startswith(prefix) else first)


def _check_sections(kind: Any, plain: Any, prefix: str) -> None:
    """A section (a dataclass-typed key) given as a scalar: omegaconf's merge error names no key, this one does."""
    if not isinstance(plain, dict):
        return
    for key, value in plain.items():
        sub = _child_type(kind, str(key))
        if is_dataclass(sub) and value is not None and not isinstance(value, dict):
            raise ConfigError(f"config key {_joined(prefix, str(key))}: expected a mapping of {sub.__name__} "
                              f"fields, got {type(value).__name__} {value!r}")
        if sub is not None:
            _check_sections(sub, value, _joined(prefix, str(key)))


def merged(cls: type, raw: Any, where: str = "") -> DictConfig:
    """``raw`` merged onto ``cls``'s structured config: keys and types checked, values not yet."""
    if raw is not None and not isinstance(raw, (dict, DictConfig)):
        raise ConfigError(f"{where or cls.__name__} must be a mapping of {cls.__name__} fields, "
                          f"got {type(raw).__name__}")
    plain = OmegaConf.to_container(raw, resolve=True) if isinstance(raw, DictConfig) else (raw or {})
    _check_sections(cls, plain, where)
    try:
        return OmegaConf.merge(OmegaConf.structured(cls), plain)
    except OmegaConfBaseException as e:
        raise _one_line(e, cls, where) from None


_LOADED: "OrderedDict[tuple, Any]" = OrderedDict()  # (cls, where, canonical JSON of raw) -> a loaded instance
_LOADED_MAX = 1024


def _memo_key(cls: type, raw: Any, where: str) -> Optional[tuple]:
    """A key for a plain mapping of JSON values (what the solver hands in, tens of times per plan); None
    for anything else (a DictConfig may hold interpolations), which is loaded afresh."""
    if raw is not None and not isinstance(raw, dict):
        return None
    try:
        return cls, where, json.dumps(raw, sort_keys=True, allow_nan=True)
    except (TypeError, ValueError):
        return None


def load(cls: type[T], raw: Any, where: str = "") -> T:
    """``raw`` (a dict, DictConfig or None) as a ``cls`` instance, every key, type and value checked.

    ``where`` prefixes the keys in error messages (``model`` for a ``ModelConfig``). The structured
    merge costs ~20 ms; a mapping already loaded once is returned as a deep copy of that result (a
    fresh object, as a new load would be): the budget solver loads the same model configs many times."""
    key = _memo_key(cls, raw, where)
    if key is not None and key in _LOADED:
        _LOADED.move_to_end(key)
        return copy.deepcopy(_LOADED[key])
    obj = _load(cls, raw, where)
    if key is not None:
        _LOADED[key] = copy.deepcopy(obj)
        while len(_LOADED) > _LOADED_MAX:
            _LOADED.popitem(last=False)
    return obj


def _load(cls: type[T], raw: Any, where: str) -> T:
    node = merged(cls, raw, where)
    try:
        return OmegaConf.to_object(node)
    except OmegaConfBaseException as e:
        raise _one_line(e, cls, where) from None
    except ConfigError:
        raise
    except ValueError as e:  # a __post_init__ value check: its message names the key
        raise ConfigError(str(e)) from None


def check_keys(cls: type, raw: Any, where: str) -> dict:
    """A partial mapping of ``cls`` fields (e.g. a family's ``moe:`` overrides), keys and types checked.

    Returns a plain dict of the given keys only; whole-object value checks wait for the full config."""
    merged(cls, raw, where)
    return dict(OmegaConf.to_container(raw, resolve=True)) if isinstance(raw, DictConfig) else dict(raw or {})
