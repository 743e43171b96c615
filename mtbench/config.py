"""Typed method configs and the command-line method-option syntax.

Every method has a dataclass config deriving from :class:`MethodConfig`. Each field carries ``metadata={"help": ...}``,
``"choices"`` for enumerations and bounds for numbers (``"gt"``, ``"ge"``, ``"lt"``, ``"le"``; helpers :func:`positive`,
:func:`at_least`, :func:`probability`); :meth:`MethodConfig.validate` checks them (subclasses add cross-field checks).
Options arrive as strings from the command line and are converted by field type.

Method-option syntax (``mtbench run --methods``)::

    NAME[:KEY=VALUE[,KEY=VALUE...]][,NAME...]

A comma-separated item that contains ``=`` but no ``:`` continues the options of the method before it, so
``tadformer:r=32,filter=static,mtlora:r=64,lora`` is three methods. Tuple-valued options join items with ``+``
(``lora:targets=qkv+proj``). Booleans accept ``true/false/1/0/yes/no/on/off``.
"""

from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from mtbench.errors import MtbenchError

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


@dataclass
class MethodConfig:
    """Base of all method configs. Subclasses add fields with ``metadata={"help": ...}``."""

    method_name: ClassVar[str] = "method"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check the fields' ``choices`` and bounds (module docstring).

        Raises:
            MtbenchError: naming the method, the field, what is accepted and the bad value, e.g.
                ``mtlora: r must be > 0, got 0`` or ``lora: dropout must be in [0, 1), got 1.5``.
        """
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise MtbenchError(f"{self.method_name}: {f.name}={value!r} is not one of {', '.join(map(str, choices))}")
            accepted = _bounds_text(f.metadata)
            if accepted and not all(_CHECKS[k](value, f.metadata[k]) for k in _CHECKS if k in f.metadata):
                raise MtbenchError(f"{self.method_name}: {f.name} must be {accepted}, got {value}")

    @classmethod
    def describe_options(cls) -> list[tuple[str, str, str]]:
        """``[(name, default as typed on the command line (:func:`option_text`), help)]`` for ``mtbench list``."""
        out = []
        for f in fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            help_ = f.metadata.get("help", "")
            if f.metadata.get("choices"):
                help_ += f" ({'|'.join(map(str, f.metadata['choices']))})"
            if accepted := _bounds_text(f.metadata):
                help_ += f" ({accepted})"
            out.append((f.name, option_text(default), help_))
        return out

    @classmethod
    def from_options(cls, options: dict[str, Any] | None = None, base: dict[str, Any] | None = None):
        """Build a config from string (or typed) options on top of ``base`` (a variant's presets).

        Raises:
            MtbenchError: an option this method does not have, or a value of the wrong type or out of range.
        """
        known = {f.name: f for f in fields(cls)}
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for source in (base or {}), (options or {}):
            for key, raw in source.items():
                if key not in known:
                    raise MtbenchError(f"method {cls.method_name!r} has no option {key!r}; options: "
                                       f"{', '.join(known) or '(none)'}")
                values[key] = _convert(cls.method_name, key, raw, hints[key])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in fields(self)}

    def inert_options(self) -> dict[str, str]:
        """Options that have no effect on the model given this config's other values, each with the reason
        (``{"filter": "dtf=false (no filter in the TA-module)"}``). :func:`mtbench.registry.resolve_spec` refuses
        such an option when it is given a value other than its preset's: the run would be the same model under a
        second result key, and a researcher would believe an ablation ran that did not. Default: none."""
        return {}


_CHECKS = {"gt": lambda v, b: v > b, "ge": lambda v, b: v >= b, "lt": lambda v, b: v < b, "le": lambda v, b: v <= b}
_OPS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _bounds_text(meta) -> str:
    """What a field's bounds accept, as the error and ``mtbench list`` say it: ``> 0``, ``>= 2``, ``in [0, 1)``."""
    lo = next(((k, meta[k]) for k in ("gt", "ge") if k in meta), None)
    hi = next(((k, meta[k]) for k in ("lt", "le") if k in meta), None)
    if lo and hi:
        return f"in {'(' if lo[0] == 'gt' else '['}{lo[1]}, {hi[1]}{')' if hi[0] == 'lt' else ']'}"
    one = lo or hi
    return f"{_OPS[one[0]]} {one[1]}" if one else ""


def positive(help: str, **meta) -> dict[str, Any]:
    """Field metadata: ``help`` and the bound ``> 0``."""
    return {"help": help, "gt": 0, **meta}


def at_least(low: int, help: str, **meta) -> dict[str, Any]:
    """Field metadata: ``help`` and the bound ``>= low``."""
    return {"help": help, "ge": low, **meta}


def probability(help: str, **meta) -> dict[str, Any]:
    """Field metadata for a dropout-like probability: ``help`` and the bounds ``[0, 1)``."""
    return {"help": help, "ge": 0, "lt": 1, **meta}


def option_text(value: Any) -> str:
    """An option value as typed on the command line, the inverse of the parsing above: tuples and lists joined by
    ``+``, booleans lower case, everything else ``str`` (a float's shortest round-tripping repr)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "+".join(map(str, value))
    return str(value)


def _convert(method: str, key: str, raw: Any, hint: Any) -> Any:
    origin = typing.get_origin(hint)
    if not isinstance(raw, str):
        return tuple(raw) if origin is tuple and isinstance(raw, list) else raw
    text = raw.strip()
    try:
        if hint is bool:
            low = text.lower()
            if low in _TRUE:
                return True
            if low in _FALSE:
                return False
            raise ValueError
        if hint is int:  # plain decimal digits (not 0_8 or full-width digits), within torch's int64 sizes
            if not re.fullmatch(r"[+-]?[0-9]+", text):
                raise ValueError
            value = int(text)
            if abs(value) >= 2**63:
                raise MtbenchError(f"{method}: option {key}={raw!r} is out of range (|value| < 2**63)")
            return value
        if hint is float:
            value = float(text)
            if not math.isfinite(value):
                raise MtbenchError(f"{method}: option {key}={raw!r} is not a finite number")
            return value
        if origin is tuple:
            items = tuple(text.split("+"))
            if not all(items):
                raise MtbenchError(f"{method}: option {key}={raw!r} has an empty item; give items joined by single "
                                   "'+'")
            if len(set(items)) != len(items):
                raise MtbenchError(f"{method}: option {key}={raw!r} names an item twice")
            return items
        return text
    except MtbenchError:
        raise
    except ValueError:
        kind = getattr(hint, "__name__", str(hint))
        raise MtbenchError(f"{method}: option {key}={raw!r} is not a valid {kind}") from None


@dataclass(frozen=True)
class MethodSpec:
    """One parsed item of ``--methods``: a method (or variant) name and its raw string options."""

    name: str
    options: dict[str, str]

    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.name}:{opts}" if opts else self.name


def parse_method_specs(text: str) -> list[MethodSpec]:
    """Parse the ``--methods`` value (syntax in the module docstring).

    Raises:
        MtbenchError: empty list, an option before any method, a malformed ``key=value`` or a repeated option.
    """
    specs: list[tuple[str, dict[str, str]]] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        if ":" in item or "=" not in item:
            name, _, rest = item.partition(":")
            name = name.strip().lower()
            if not name:
                raise MtbenchError(f"missing method name in {item!r}")
            specs.append((name, {}))
            if not rest:
                continue
            item = rest
        if not specs:
            raise MtbenchError(f"option {item!r} comes before any method name")
        for kv in item.split(":"):
            key, eq, value = kv.partition("=")
            key = key.strip()
            if not eq or not key or not value.strip():
                raise MtbenchError(f"malformed method option {kv!r}; expected KEY=VALUE")
            if key in specs[-1][1]:
                raise MtbenchError(f"option {key!r} given twice for method {specs[-1][0]!r}")
            specs[-1][1][key] = value.strip()
    if not specs:
        raise MtbenchError("no method given; use e.g. --methods mtlora,lora (see `mtbench list`)")
    return [MethodSpec(n, o) for n, o in specs]


def share_field(default: str = "dedicated"):
    """The ``share`` option of every method that offers both multi-task conventions (TDSS Table 1 "sha." / "ded."):
    ``shared`` = one set of modules for all tasks, one backbone pass; ``dedicated`` = one set per task, the task
    streams stacked on the batch through one frozen-backbone call (:meth:`mtbench.model.MultiTaskModel.use_convention`).
    """
    return dataclasses.field(default=default, metadata={
        "help": "shared: one module set for all tasks, one backbone pass; dedicated: one set per task, T stacked "
                "backbone passes", "choices": ("shared", "dedicated")})
