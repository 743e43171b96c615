"""Method registry: the only way the core reaches a method.

Methods live in the top-level ``methods`` package, one file each, and register their model class with
:func:`register_method` (a decorator keyed by a lowercase name, as timm's ``register_model`` and peft's
``register_peft_method``). Variants are named presets of options (``mtlora_plus`` = ``mtlora`` with ``plus=true``)
and resolve to their method.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from mtbench.config import MethodConfig, MethodSpec, option_text
from mtbench.errors import MtbenchError, out_of_memory


@dataclass(frozen=True)
class PaperCount:
    """A #TP a paper reports, for ``mtbench params``.

    Attributes:
        options: method options that reproduce the paper's configuration (e.g. ``{"r": 16}``).
        millions: the number printed in the paper, in millions.
        source: where it is printed (paper and table).
        exact: the exact count our build must give (asserted in tests), when it is known from the official code.
        note: why ours and the paper's may differ.
        decoder: the decoder (:data:`mtbench.decoders.DECODERS` key) the printed count sits on; ``exact`` is
            checked only under that decoder (``mtbench params --decoder``).
    """

    options: dict[str, Any]
    millions: float | None
    source: str
    exact: int | None = None
    note: str = ""
    decoder: str = "mtlora_hrnet"


@dataclass(frozen=True)
class MethodInfo:
    """Everything the registry knows of a method."""

    name: str
    model_cls: type
    config_cls: type[MethodConfig]
    paper: str
    code: str
    summary: str
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)
    paper_counts: tuple[PaperCount, ...] = ()


_METHODS: dict[str, MethodInfo] = {}
_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {}
_LOADED = False


def register_method(
    name: str,
    *,
    config: type[MethodConfig],
    paper: str,
    code: str,
    summary: str,
    variants: dict[str, dict[str, Any]] | None = None,
    paper_counts: Sequence[PaperCount] = (),
) -> Callable[[type], type]:
    """Class decorator registering a :class:`mtbench.model.MultiTaskModel` subclass.

    Raises:
        ValueError: name not lowercase, or already registered (a programming error, not user input).
    """

    def deco(cls: type) -> type:
        if name != name.lower() or not name.isidentifier():
            raise ValueError(f"method name must be a lowercase identifier: {name!r}")
        if name in _METHODS or name in _VARIANTS:
            raise ValueError(f"method {name!r} registered twice")
        config.method_name = name
        _METHODS[name] = MethodInfo(name, cls, config, paper, code, summary, dict(variants or {}),
                                    tuple(paper_counts))
        for vname, preset in (variants or {}).items():
            if vname in _METHODS or vname in _VARIANTS:
                raise ValueError(f"variant {vname!r} registered twice")
            _VARIANTS[vname] = (name, dict(preset))
        cls.method_name = name
        return cls

    return deco


def _ensure_loaded() -> None:
    global _LOADED
    if not _LOADED:
        importlib.import_module("methods")
        _LOADED = True


def list_methods() -> list[MethodInfo]:
    """Every registered method, in registration order."""
    _ensure_loaded()
    return list(_METHODS.values())


def valid_names() -> list[str]:
    _ensure_loaded()
    return list(_METHODS) + list(_VARIANTS)


def resolve(name: str) -> tuple[MethodInfo, str, dict[str, Any]]:
    """Resolve a method or variant name to ``(method info, variant name, preset options)``.

    The variant name is ``"default"`` for a plain method name.

    Raises:
        MtbenchError: unknown name (the message lists the valid names).
    """
    _ensure_loaded()
    key = name.strip().lower()
    if key in _METHODS:
        return _METHODS[key], "default", {}
    if key in _VARIANTS:
        base, preset = _VARIANTS[key]
        return _METHODS[base], key, dict(preset)
    raise MtbenchError(f"unknown method {name!r}; valid: {', '.join(valid_names())}")


@dataclass
class ResolvedMethod:
    """A method spec checked against the registry: info, variant (``default`` or a registered variant name), typed
    config and the method part of the result key."""

    info: MethodInfo
    variant: str
    config: MethodConfig
    spec: MethodSpec

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def method_key(self) -> str:
        """Directory name of this configuration in the result store (:func:`mtbench.identity.method_key`: the
        variant plus the options that depart from its preset), where ``run`` and ``profile`` both write."""
        from mtbench.identity import method_key, option_departures

        return method_key(self.variant, option_departures(self.name, self.variant, self.config.to_dict()))

    @property
    def label(self) -> str:
        """Row label for tables, e.g. ``mtlora (r=32)``."""
        opts = ", ".join(f"{k}={v}" for k, v in sorted(self.spec.options.items()))
        head = self.name if self.variant == "default" else self.variant
        return f"{head} ({opts})" if opts else head


def resolve_spec(spec: MethodSpec) -> ResolvedMethod:
    """Check a parsed ``--methods`` item: known name, known options, valid values.

    A variant defined by one option (``mtlora_plus``: ``plus=true``) cannot have that option overridden: the result
    would be the base method under a second name and a second result key. A variant defined by several options
    (``tadformer_official``) may have one of them overridden (e.g. ``tadformer_official:skip_layout=correct``).
    Conversely a plain method given a variant's whole preset (``mtlora:plus=true``, ``adapter:share=shared``)
    resolves to that variant (``mtlora_plus``, ``vl_adapter``), so one configuration has one key and one label; so
    does a plain method whose configuration is a variant's preset because that preset is the method's default
    (``vpt`` and ``vpt:share=shared`` are ``vpt_shallow`` and ``vpt_shallow:share=shared``).

    An option given a value other than its preset's where it has no effect (:meth:`MethodConfig.inert_options`,
    e.g. ``tadformer:dtf=false,filter=static``) is refused: the run would be the same model under a second key.

    Raises:
        MtbenchError: unknown method or option, an invalid value, a one-option variant's option overridden, or an
            option without effect given a value.
    """
    info, variant, preset = resolve(spec.name)
    cfg = info.config_cls.from_options(spec.options, base=preset)
    base = info.config_cls.from_options({}, base=preset)
    for key, why in cfg.inert_options().items():
        if key in spec.options and getattr(cfg, key) != getattr(base, key):
            raise MtbenchError(f"{spec.label()}: {key}={option_text(getattr(cfg, key))} has no effect with {why}; "
                               f"leave {key} out")
    if len(preset) == 1:
        (key, value), = preset.items()
        if key in spec.options and getattr(cfg, key) != getattr(base, key):
            raise MtbenchError(f"{spec.label()}: the variant {variant} is {info.name} with {key}={option_text(value)}; "
                               f"for {key}={spec.options[key]} use "
                               f"{info.name}:{key}={spec.options[key]}")
    if variant == "default":
        for vname, vpreset in sorted(info.variants.items(), key=lambda kv: -len(kv[1])):
            vcfg = info.config_cls.from_options(vpreset)
            if all(getattr(cfg, k) == getattr(vcfg, k) for k in vpreset):
                rest = {k: v for k, v in spec.options.items() if k not in vpreset}
                return ResolvedMethod(info, vname, cfg, MethodSpec(vname, rest))
    return ResolvedMethod(info, variant, cfg, spec)


def build_model(resolved: ResolvedMethod, backbone, tasks, decoder: str | None = None):
    """Instantiate the method's model and apply its structural freezing.

    Args:
        resolved: from :func:`resolve_spec`.
        backbone: :class:`mtbench.swin.SwinBackbone` (modified in place by methods that inject modules).
        tasks: list of :class:`mtbench.tasks.TaskSpec`.
        decoder: a key of :data:`mtbench.decoders.DECODERS`; None = the backbone's default.

    Raises:
        MtbenchError: unknown decoder, or a configuration whose parameters do not fit in memory (naming it).
    """
    try:
        model = resolved.info.model_cls(backbone, tasks, resolved.config)
    except (RuntimeError, MemoryError) as e:
        if (what := out_of_memory(e)) is None:
            raise
        raise MtbenchError(f"{resolved.spec.label()}: building the model ran out of memory ({what}); lower its "
                           "sizes") from None
    if decoder is not None and decoder != model.decoder_name:
        model.set_decoder(decoder)
    model.apply_trainability()
    from mtbench.lora import recompute_lora_inputs

    recompute_lora_inputs(model)  # LoRA inputs recomputed in backward, not kept (training memory; exact)
    return model
