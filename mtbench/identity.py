"""What a table row means: a run's identity, its result path and its label.

A run's **identity** is everything that can change its numbers except the seed: the method and its options, the
dataset and tasks, the backbone and its weights (``pretrained``, ``random`` or the hash of a weights file), the
decoder, the recipe (a named preset plus every override of it) and the evaluation protocol. Runs that differ only in
the seed share an identity; ``mtbench table`` aggregates exactly the runs of one identity into one row.

The result path is ``{results}/{dataset}/{method}/{key}/seed{S}.json``. The key is readable: ``default`` for the
default everything, otherwise the variant name and every option that departs from it (``r=32``,
``mtlora_plus_r=32``), followed by one ``_name=value`` token per other departure from the dataset's defaults, in a
fixed order (``default_init=random``, ``default_epochs=1_train-size=256``). Only explicit departures are encoded, so
every key names a different identity; a key longer than :data:`MAX_KEY` characters is cut and completed with a hash
of the whole identity. The identity itself is stored in the result file (``identity``); files written before it
existed are read with the identity reconstructed from what they record (:func:`identity_of`).

Where new fields go: a new field of :class:`RunIdentity` needs (1) a default in :func:`setting_defaults` (per
dataset), (2) a token name in :data:`PATH_TOKENS` and (3) a value from the run request in
``mtbench.runner.plan``. ``decoder``, ``preset`` and ``eval_protocol`` already exist with today's single choice each.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import shlex
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from mtbench.config import option_text

#: Recipe fields a user can override on the command line, in path order, with the token used in paths and labels.
RECIPE_OVERRIDES = {"epochs": "epochs", "batch_size": "batch-size", "lr": "lr", "train_size": "train-size",
                    "max_train_batches": "max-train-batches"}
#: Overrides that make a run a smoke run (a shortened data budget), marked as such in tables.
SMOKE_OVERRIDES = ("train_size", "max_train_batches")
#: Identity field -> path token, in path order (recipe overrides follow ``preset``, ``eval_protocol`` comes last).
PATH_TOKENS = {"weights": "init", "backbone": "backbone", "tasks": "tasks", "decoder": "decoder", "preset": "preset",
               "eval_protocol": "eval"}
#: Longest readable key; longer ones are cut and completed with a hash of the identity.
MAX_KEY = 120


class RunIdentity(BaseModel):
    """Everything that can change a run's numbers except the seed (stored as ``identity`` in result files).

    Attributes:
        method: registered method name.
        variant: ``default`` or the registered variant name the run was asked for (``mtlora_plus``).
        options: every option of the method's typed config (the full dict; departures are derived).
        option_departures: the options that differ from the variant's preset config, formatted as on the command
            line (``{"r": "32"}``); these name the path and the label.
        dataset: dataset name.
        tasks: tasks in order.
        backbone: backbone name (``swin_embedded``, ``swin_tiny_patch4_window7_224``).
        weights: ``pretrained``, ``random``, or ``sha256:<16 hex>`` of a local weights file.
        weights_file: name of that local file (informative; not part of the comparison).
        decoder: decoder name (today one per dataset; a per-run choice adds more).
        preset: recipe preset name (``embedded`` on the synthetic dataset, ``paper`` in the papers' setting).
        overrides: recipe fields overridden on the command line with a value different from the preset's
            (keys of :data:`RECIPE_OVERRIDES`; ``train_size`` in images, ``lr`` the peak learning rate).
        eval_protocol: evaluation protocol name (today one per dataset).
    """

    method: str
    variant: str = "default"
    options: dict[str, Any] = Field(default_factory=dict)
    option_departures: dict[str, str] = Field(default_factory=dict)
    dataset: str
    tasks: list[str]
    backbone: str
    weights: str = "pretrained"
    weights_file: str | None = None
    decoder: str
    preset: str
    overrides: dict[str, Any] = Field(default_factory=dict)
    eval_protocol: str
    reconstructed: bool = Field(False, description="True when read from a file written before identities existed")

    # ---- comparison -------------------------------------------------------------------------------------------

    def setting(self) -> dict[str, Any]:
        """The identity without the method: what a run shares with its Δm references when they are comparable."""
        return {"dataset": self.dataset, "tasks": list(self.tasks), "backbone": self.backbone,
                "weights": self.weights, "decoder": self.decoder, "preset": self.preset,
                "overrides": dict(sorted(self.overrides.items())), "eval_protocol": self.eval_protocol}

    def canonical(self) -> dict[str, Any]:
        """The fields that define the identity (informative fields and the full option dict excluded)."""
        return {"method": self.method, "variant": self.variant,
                "options": dict(sorted(self.option_departures.items())), **self.setting()}

    def key(self) -> str:
        """A string equal for equal identities and different otherwise (canonical JSON)."""
        return json.dumps(self.canonical(), sort_keys=True, default=str)

    def digest(self, n: int = 8) -> str:
        """Short hash of :meth:`key` (hex, ``n`` characters)."""
        return hashlib.sha256(self.key().encode()).hexdigest()[:n]

    # ---- naming -----------------------------------------------------------------------------------------------

    def departures(self) -> list[tuple[str, str]]:
        """``[(token, value)]`` for every field that departs from the dataset's defaults, in path order."""
        defaults = setting_defaults(self.dataset)
        out: list[tuple[str, str]] = []
        for name, token in PATH_TOKENS.items():
            value = getattr(self, name)
            if name == "tasks":
                if list(value) != list(defaults["tasks"]):
                    out.append((token, "+".join(value)))
            elif name == "weights":
                if value != "pretrained":
                    out.append((token, value.split(":", 1)[1] if value.startswith("sha256:") else value))
            elif value != defaults[name]:
                out.append((token, str(value)))
            if name == "preset":  # recipe overrides right after the preset they modify
                for field, tok in RECIPE_OVERRIDES.items():
                    if field in self.overrides:
                        out.append((tok, option_text(self.overrides[field])))
        return out

    def method_key(self) -> str:
        """See :func:`method_key`."""
        return method_key(self.variant, self.option_departures)

    def path_key(self) -> str:
        """The directory name of this identity under ``{dataset}/{method}/`` (see the module docstring)."""
        key = "_".join([self.method_key()] + [f"{t}={_safe(v)}" for t, v in self.departures()])
        if len(key) > MAX_KEY:
            key = key[:MAX_KEY - 10] + "_" + self.digest()
        return key

    def result_path(self, root: str | Path, seed: int) -> Path:
        """``{root}/{dataset}/{method}/{path_key}/seed{seed}.json``."""
        return Path(root) / self.dataset / self.method / self.path_key() / f"seed{seed}.json"

    def is_smoke(self) -> bool:
        """True when the run trained on a cut-down data budget (``--train-size`` or ``--max-train-batches``)."""
        return any(k in self.overrides for k in SMOKE_OVERRIDES)

    def label(self) -> str:
        """Table label: ``mtlora (r=32)``, ``decoder_only [random init]``,
        ``decoder_only [smoke: epochs=1, train-size=256]``."""
        head = self.method if self.variant == "default" else self.variant
        if self.option_departures:
            head += " (" + ", ".join(f"{k}={v}" for k, v in sorted(self.option_departures.items())) + ")"
        deps = [("random init" if (t, v) == ("init", "random") else
                 f"weights={self.weights_file or v}" if t == "init" else f"{t}={v}") for t, v in self.departures()]
        if not deps:
            return head
        return f"{head} [{'smoke: ' if self.is_smoke() else ''}{', '.join(deps)}]"


def _safe(v: str) -> str:
    """Keep a path token filesystem-safe (no separators or spaces)."""
    return re.sub(r"[^A-Za-z0-9.+=-]", "-", v)


def setting_defaults(dataset: str) -> dict[str, Any]:
    """The default of every non-method identity field on ``dataset``: departures from these name paths and labels.

    Today each of ``decoder``, ``preset`` and ``eval_protocol`` has one value per dataset; per-run choices add
    values (the defaults here must stay the names of today's behaviour so that existing results keep their keys).
    """
    from mtbench.datasets import get_dataset
    from mtbench.decoders import resolve_decoder
    from mtbench.tasks import resolve_tasks

    spec = get_dataset(dataset)
    return {"tasks": [t.name for t in resolve_tasks(dataset)], "backbone": spec.backbone,
            "decoder": resolve_decoder(None, spec.backbone).name, "preset": spec.default_preset,
            "eval_protocol": "resized"}


def method_key(variant: str, departures: dict[str, str]) -> str:
    """The method part of a result's or profile's directory name: ``default``, or the variant name and the option
    departures from its preset (:func:`option_departures`) joined by ``_`` (``mtlora_plus_r=32``). An option given at
    its preset value (``mtlora:r=16``) is no departure, so such a run and its profile land beside the default's."""
    parts = [] if variant == "default" else [variant]
    parts += [f"{k}={v}" for k, v in sorted(departures.items())]
    return "_".join(parts) if parts else "default"


def option_departures(method: str, variant: str, options: dict[str, Any]) -> dict[str, str]:
    """The options of a run that differ from its variant's preset config, formatted as on the command line.

    Raises:
        MtbenchError: unknown method or variant.
    """
    from mtbench.registry import resolve

    info, _, preset = resolve(method if variant == "default" else variant)
    base = info.config_cls.from_options({}, base=preset).to_dict()
    return {k: option_text(v) for k, v in options.items() if k in base and base[k] != v}


@functools.lru_cache(maxsize=64)
def _file_hash(path: str, size: int, mtime: float) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def weights_id(init: str, weights: str | None) -> tuple[str, str | None]:
    """``(weights field, weights_file)``: ``pretrained`` / ``random``, or ``sha256:<16 hex>`` of a local file and its
    name. A recorded path that no longer exists is identified by its name (``path:NAME``)."""
    if weights is None:
        return init, None
    p = Path(weights)
    if not p.is_file():
        return f"path:{p.name}", p.name
    st = p.stat()
    return f"sha256:{_file_hash(str(p.resolve()), st.st_size, st.st_mtime)}", p.name


def make_identity(*, method: str, variant: str, options: dict[str, Any], dataset: str, tasks: list[str],
                  init: str = "pretrained", weights: str | None = None, backbone: str | None = None,
                  decoder: str | None = None, preset: str | None = None, eval_protocol: str | None = None,
                  recipe: dict[str, Any] | None = None, preset_recipe: dict[str, Any] | None = None,
                  train_size: int | None = None, reconstructed: bool = False) -> RunIdentity:
    """Build an identity; ``None`` fields take the dataset's defaults (:func:`setting_defaults`).

    ``recipe`` is the run's effective recipe and ``preset_recipe`` the preset's; the overrides are the fields of
    :data:`RECIPE_OVERRIDES` that differ between them (``train_size`` is passed separately; ``None`` = the whole
    split).
    """
    d = setting_defaults(dataset)
    overrides: dict[str, Any] = {}
    if recipe is not None and preset_recipe is not None:
        for k in RECIPE_OVERRIDES:
            if k in recipe and k in preset_recipe and recipe[k] != preset_recipe[k]:
                overrides[k] = recipe[k]
    if train_size is not None:
        overrides["train_size"] = int(train_size)
    w, wfile = weights_id(init, weights)
    return RunIdentity(method=method, variant=variant, options=dict(options),
                       option_departures=option_departures(method, variant, options), dataset=dataset,
                       tasks=list(tasks), backbone=backbone or d["backbone"], weights=w, weights_file=wfile,
                       decoder=decoder or d["decoder"], preset=preset or d["preset"], overrides=overrides,
                       eval_protocol=eval_protocol or d["eval_protocol"], reconstructed=reconstructed)


def _flag_value(command: str | None, flag: str) -> str | None:
    """The value of ``--flag V`` or ``--flag=V`` in a recorded command line, or None."""
    if not command:
        return None
    try:
        words = shlex.split(command)
    except ValueError:
        words = command.split()
    for i, w in enumerate(words):
        if w == flag and i + 1 < len(words):
            return words[i + 1]
        if w.startswith(flag + "="):
            return w.split("=", 1)[1]
    return None


def identity_of(result) -> RunIdentity:
    """The identity of a :class:`mtbench.results.RunResult`: the stored one, or, for files written before
    identities existed, one reconstructed from what the file records (method, label, options, dataset, tasks,
    backbone, init, recipe compared with today's preset, and ``--train-size`` from the recorded command)."""
    if getattr(result, "identity", None) is not None:
        return result.identity
    run = result.run
    head = run.label.split(" ")[0]
    variant = head if head != run.method else "default"
    init = run.init if run.init in ("pretrained", "random") else "pretrained"
    weights = None if run.init in ("pretrained", "random") else run.init
    ts = _flag_value(run.command, "--train-size")
    preset_recipe = _preset_recipe(run.dataset, getattr(run, "preset", None))
    return make_identity(method=run.method, variant=variant, options=run.options, dataset=run.dataset,
                         tasks=run.tasks, init=init, weights=weights, backbone=run.backbone,
                         recipe=result.train.recipe, preset_recipe=preset_recipe,
                         train_size=int(ts) if ts and ts.isdigit() else None, reconstructed=True)


def reference_identity(entry: dict, dataset: str) -> RunIdentity:
    """The identity of the single-task runs behind a Δm reference entry of ``single_task_references.json``: the
    stored ``identity``, or one reconstructed from its recipe, init and tasks."""
    if entry.get("identity"):
        return RunIdentity.model_validate(entry["identity"])
    init = entry.get("init", "pretrained")
    builtin = init in ("pretrained", "random")
    return make_identity(method="single_task", variant="default", options={}, dataset=dataset,
                         tasks=list(entry["primary"]), init=init if builtin else "pretrained",
                         weights=None if builtin else init, recipe=entry.get("recipe"),
                         preset_recipe=_preset_recipe(dataset, None), reconstructed=True)


def _preset_recipe(dataset: str, preset: str | None) -> dict[str, Any] | None:
    """The recipe of ``dataset``'s preset ``preset`` (None: its default) as recorded in result files, or None for
    an unknown dataset or preset."""
    from mtbench.datasets import resolve_recipe
    from mtbench.errors import MtbenchError
    from mtbench.train import recipe_dict

    try:
        return recipe_dict(resolve_recipe(dataset, preset)[1])
    except MtbenchError:
        return None


__all__ = ["RunIdentity", "make_identity", "identity_of", "reference_identity", "setting_defaults",
           "RECIPE_OVERRIDES", "PATH_TOKENS"]
