"""Where a method's time goes: wall time per aten operator of one training step and one inference, side by side.

Each operator call is timed at dispatch (``torch.utils._python_dispatch.TorchDispatchMode``, ``perf_counter`` around
the call; on CUDA the device is synchronised after each call), for forward and backward alike. Use it to see which
operators make a method slower than another, e.g. ``mtlora`` against ``mtl_full``. It measures wall time per call,
which torch's profiler does not do faithfully for large elementwise operators on a CPU VM: there a 96 MB GELU that
takes 8 ms showed as 59 ms (issue 6).

The workload is the one ``mtbench profile`` times (:class:`mtbench.measure.Workload`: a dataset's setting, random
weights and inputs, the training step with AdamW at ``--batch-size``, inference at batch 1 with the shared LoRA
merged). ``--warmup`` untimed steps come first (the allocator's heap grows during the first steps).

Run from a checkout root, e.g.::

    PYTHONPATH=$PWD python benchmarks/ops.py --methods mtl_full,mtlora --dataset pascal_context

Output: one table per mode (train, inference), operators sorted by the largest difference from the first method,
in ms per call of the whole step, with each method's total of the timed operators and its plain wall time.
"""

from __future__ import annotations

import argparse
import collections
import time

import torch
from specs import split_methods
from torch.utils._python_dispatch import TorchDispatchMode


class OperatorTimer(TorchDispatchMode):
    """Wall time (s) and call count per aten operator of everything run inside the ``with`` block."""

    def __init__(self, sync=lambda: None):
        super().__init__()
        self.sync = sync
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.calls: dict[str, int] = collections.defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        self.sync()
        name = func.overloadpacket.__name__
        self.seconds[name] += time.perf_counter() - t0
        self.calls[name] += 1
        return out


def operator_times(fn, repeats: int, sync) -> tuple[dict[str, float], float]:
    """``({operator: ms per repeat}, plain wall ms per repeat)`` of ``fn``; the plain time is taken first, without
    the timer."""
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    wall = (time.perf_counter() - t0) * 1e3 / repeats
    timer = OperatorTimer(sync)
    with timer:
        for _ in range(repeats):
            fn()
    return {k: v * 1e3 / repeats for k, v in timer.seconds.items()}, wall


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="mtl_full,mtlora", help="comma-separated --methods items; the first is the "
                                                                 "reference")
    ap.add_argument("--dataset", default="pascal_context")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    args = ap.parse_args(argv)

    from mtbench.cpu import configure_cpu
    from mtbench.measure import Workload, synchronizer
    from mtbench.train import resolve_device

    configure_cpu()
    device = resolve_device(args.device)
    sync = synchronizer(device)
    specs = split_methods(args.methods)
    results = {"train": {}, "inference": {}}
    for spec in specs:
        w = Workload(spec, args.dataset, args.batch_size, device)
        for _ in range(args.warmup):
            w.train_step()
        results["train"][w.label] = operator_times(w.train_step, args.repeats, sync)
        with w.evaluated():
            w.infer()
            results["inference"][w.label] = operator_times(w.infer, args.repeats, sync)
        del w
    for mode, per_method in results.items():
        labels = list(per_method)
        ops = set().union(*(t for t, _ in per_method.values()))
        ref = per_method[labels[0]][0]

        def largest_difference_first(op: str) -> tuple[float, float]:  # ties (one method alone): slowest first
            return (-max(abs(per_method[m][0].get(op, 0.0) - ref.get(op, 0.0)) for m in labels), -ref.get(op, 0.0))

        order = sorted(ops, key=largest_difference_first)
        print(f"\n{mode} ({args.dataset}, batch {args.batch_size if mode == 'train' else 1}, {device}, "
              f"{torch.get_num_threads()} threads; ms per step)")
        print("| operator | " + " | ".join(labels) + " |")
        print("|---|" + "---|" * len(labels))
        for op in order[:args.rows]:
            print(f"| {op} | " + " | ".join(f"{per_method[m][0].get(op, 0.0):.1f}" for m in labels) + " |")
        print("| **sum of operators** | " + " | ".join(f"{sum(per_method[m][0].values()):.0f}" for m in labels) + " |")
        print("| **wall, untimed run** | " + " | ".join(f"{per_method[m][1]:.0f}" for m in labels) + " |")


if __name__ == "__main__":
    from mtbench.errors import MtbenchError

    try:
        main()
    except MtbenchError as e:  # bad method, dataset or device: one line, no traceback
        raise SystemExit(f"error: {e}") from None
