"""One serialization convention for configs: `to_dict()` gives plain JSON types, `from_dict()` rebuilds the typed,
validated config (nested configs and tuples included) and refuses keys it does not know with one clear message.

Files that hold configs carry the format version (`FORMAT_VERSION` under `VERSION_KEY`); `from_dict` accepts that key
and refuses another version, so an old or newer run directory is either read or named as unreadable.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, TypeVar

from tmpq.errors import TmpqError

FORMAT_VERSION = 1
VERSION_KEY = "format_version"

T = TypeVar("T", bound="DictConfig")


class DictConfig:
    """Mixin for frozen dataclass configs: `to_dict` / `from_dict` round trip (`from_dict(c.to_dict()) == c`)."""

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls: type[T], d: typing.Mapping[str, Any]) -> T:
        d = dict(d)
        version = d.pop(VERSION_KEY, FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise TmpqError(
                f"{cls.__name__} was written in format {version}; this tmpq reads format {FORMAT_VERSION}: "
                "use the tmpq version that wrote it, or re-run with this one"
            )
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TmpqError(
                f"{cls.__name__} has settings this tmpq does not know ({', '.join(unknown)}); it was written by a "
                "newer tmpq: upgrade, or re-run with this version"
            )
        hints = typing.get_type_hints(cls)
        try:
            return cls(**{k: _revive(hints[k], v) for k, v in d.items()})
        except (TypeError, ValueError) as e:
            raise TmpqError(
                f"the recorded {cls.__name__} is incomplete or damaged ({e}); re-run to rewrite it"
            ) from None


def _revive(tp: Any, value: Any) -> Any:
    """`value` (plain JSON) as the annotated type: nested dataclasses rebuilt, lists back to tuples."""
    if value is None:
        return None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        for a in options:
            if dataclasses.is_dataclass(a) and isinstance(value, dict):
                return _revive(a, value)
        return _revive(options[0], value) if len(options) == 1 else value
    if isinstance(tp, type) and dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return tp.from_dict(value) if issubclass(tp, DictConfig) else tp(**value)
    if origin is tuple and isinstance(value, (list, tuple)):
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_revive(args[0], v) for v in value)
        if args:
            return tuple(_revive(a, v) for a, v in zip(args, value))
        return tuple(value)
    return value
