"""The ``--methods`` list of the benchmark scripts, split into one spec string per method.

The rule is ``mtbench.config.parse_method_specs``'s: an item with ``:`` or without ``=`` starts a method, an item
``KEY=VALUE`` continues the one before, so ``lora:targets=qkv+proj,r=16,mtlora`` is two methods. The scripts keep each
spec as text (``cost.py`` also runs on older checkouts and reads an ``@MODE`` suffix), so the split is done here.
"""

from __future__ import annotations


def split_methods(text: str) -> list[str]:
    """``"lora:r=8,scale=2,mtlora@task"`` -> ``["lora:r=8,scale=2", "mtlora@task"]``.

    Raises:
        SystemExit: an option before any method name, or no method at all.
    """
    specs: list[str] = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        if ":" in item or "=" not in item:
            specs.append(item)
        elif specs:
            specs[-1] += "," + item
        else:
            raise SystemExit(f"error: option {item!r} comes before any method name")
    if not specs:
        raise SystemExit("error: no method given; e.g. --methods mtl_full,mtlora")
    return specs
