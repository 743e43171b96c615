"""The ``--methods`` list of the benchmark scripts, split into one spec string per method.

The split is mtbench's own (``mtbench.config.parse_method_specs``: an item with ``:`` or without ``=`` starts a
method, an item ``KEY=VALUE`` continues the one before), so ``lora:targets=qkv+proj,r=16,mtlora`` is two methods.
The scripts keep each spec as text (``MethodSpec.label``), because ``cost.py`` reads an ``@MODE`` suffix; both
functions exist in the older checkouts ``cost.py`` measures.
"""

from __future__ import annotations


def split_methods(text: str) -> list[str]:
    """``"lora:r=8,scale=2,mtlora@task"`` -> ``["lora:r=8,scale=2", "mtlora@task"]``.

    Raises:
        SystemExit: ``error: ...`` with the parser's message (an option before any method name, no method at all, a
            malformed or repeated option).
    """
    from mtbench.config import parse_method_specs
    from mtbench.errors import MtbenchError

    try:
        return [spec.label() for spec in parse_method_specs(text)]
    except MtbenchError as e:
        raise SystemExit(f"error: {e}") from None
