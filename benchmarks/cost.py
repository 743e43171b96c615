"""Training-step and inference cost of methods relative to ``mtl_full``, measured side by side in one process.

Setting (issue 6): Swin-T at 448x448, PASCAL-Context's 4 tasks, random weights, CPU with ``--threads`` threads (2);
training step = forward + backward at batch 2 (the optimiser step is left out: it is the same AdamW for all),
inference = eval-mode forward at batch 1 under ``no_grad`` (with the shared LoRA merged where the code supports it:
``mtbench.lora.merged_lora``; the merge and unmerge are not timed). Rounds are interleaved (each round times every
method once, in order) and the median of the rounds is reported, so that a busy machine slows every method alike.

Training memory = bytes autograd saves for backward during the step (unique storages, via
``torch.autograd.graph.saved_tensors_hooks``) plus the gradients of the trainable parameters: the part of the peak
that depends on the method (the frozen weights are the same for all). Deterministic, unlike process RSS.

After the table the script prints issue 6's targets (Done-when 3, :data:`TARGETS`) for the methods it measured:
each ratio, its target and whether it is met.

Run from a checkout root: ``PYTHONPATH=$PWD python benchmarks/cost.py`` (``--methods``, ``--rounds``, ``--size``
for a quicker look). The same script runs on older checkouts (it uses only the registry API). A method written
``NAME@MODE`` (``mtlora@task``) trains with ``--activation-checkpoint MODE``; its memory then counts what the
checkpoints keep outside their blocks, not the one block recomputed at a time in backward (``mtbench profile
--activation-checkpoint`` measures the whole peak).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from specs import split_methods


def build(spec: str, size: int):
    spec, _, mode = spec.partition("@")
    from mtbench.config import parse_method_specs
    from mtbench.registry import build_model, resolve_spec
    from mtbench.swin import create_backbone
    from mtbench.tasks import resolve_tasks

    torch.manual_seed(0)
    backbone = create_backbone("swin_tiny_patch4_window7_224", img_size=size)
    model = build_model(resolve_spec(parse_method_specs(spec)[0]), backbone, resolve_tasks("pascal_context"))
    if mode:
        model.activation_checkpoint = mode
    return model


def train_step(model, x) -> tuple[float, int]:
    """Seconds of forward + backward, and saved-activation + gradient bytes."""
    model.train()
    model.zero_grad(set_to_none=True)
    seen: dict[int, int] = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            seen[st.data_ptr()] = st.nbytes()
        except Exception:  # noqa: BLE001
            pass
        return t

    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
        loss = sum(o.float().mean() for o in out.values())
    loss.backward()
    dt = time.perf_counter() - t0
    grads = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return dt, sum(seen.values()) + grads


#: issue 6, Done-when 3: the most each ratio to ``mtl_full`` in the same run may be (train step, inference, training
#: memory; r = 16, Swin-T, 4 PASCAL tasks), in the setting of :data:`TARGET_SETTING`
TARGET_SETTING = {"size": 448, "threads": 2}
TARGETS = {
    "lora": {"memory": 1.0},
    "mtlora": {"train": 1.0, "inference": 1.10, "memory": 1.0},
    "tadformer": {"train": 1.3, "inference": 1.3, "memory": 1.0},
    "tadformer_official": {"train": 1.3, "inference": 1.3},
}


def verdict(ratios: dict[str, dict[str, float]]) -> list[tuple[str, str, float, float, bool]]:
    """Issue 6's targets for the measured methods: rows ``(method, quantity, ratio, target, met)``.

    ``ratios``: ``{spec: {"train": r, "inference": r, "memory": r}}``, ratios to ``mtl_full``. A spec counts under
    its method name alone or with ``@MODE`` (``mtlora@task``: the same model trained with ``--activation-checkpoint
    task``); a spec with options (``lora:r=8``) is another model and gets no row. ``met`` compares the ratio rounded
    to two decimals, as printed, with the target.
    """
    rows = []
    for spec, got in ratios.items():
        for quantity, target in TARGETS.get(spec.partition("@")[0], {}).items():
            rows.append((spec, quantity, got[quantity], target, round(got[quantity], 2) <= target))
    return rows


@torch.no_grad()
def infer(model, x) -> float:
    model.eval()
    try:
        from mtbench.lora import merged_lora
    except ImportError:
        merged_lora = None
    # the merge and unmerge are not timed, as in `mtbench profile`
    with merged_lora(model) if merged_lora is not None else contextlib.nullcontext():
        t0 = time.perf_counter()
        model(x)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="mtl_full,decoder_only,lora,mtlora,tadformer,tadformer_official")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--cpu-tuning", choices=("on", "off"), default="on",
                    help="apply mtbench.cpu.configure_cpu (flush denormals, glibc malloc thresholds), as every "
                         "mtbench command does; checkouts before it have none")
    args = ap.parse_args()
    try:
        from mtbench.cpu import configure_cpu
    except ImportError:
        configure_cpu = None
    if args.cpu_tuning == "on" and configure_cpu is not None:
        print("CPU settings:", configure_cpu())
    else:
        print("CPU settings: torch and glibc defaults")
    torch.set_num_threads(args.threads)
    specs = split_methods(args.methods)
    if specs[0] != "mtl_full":
        specs.insert(0, "mtl_full")
    models = {s: build(s, args.size) for s in specs}
    g = torch.Generator().manual_seed(0)
    xt = torch.randn(2, 3, args.size, args.size, generator=g)
    xi = xt[:1].clone()
    times = {s: [] for s in specs}
    inf = {s: [] for s in specs}
    mem = {}
    for s in specs:  # warm-up (allocator, first-call costs)
        train_step(models[s], xt)
        infer(models[s], xi)
    for r in range(args.rounds):
        for s in specs:
            dt, m = train_step(models[s], xt)
            times[s].append(dt)
            mem[s] = m
            inf[s].append(infer(models[s], xi))
        print(f"round {r + 1}/{args.rounds} done", flush=True)
    base_t, base_i, base_m = (statistics.median(times["mtl_full"]), statistics.median(inf["mtl_full"]),
                              mem["mtl_full"])
    print(f"\nSwin-T {args.size}, 4 PASCAL tasks, {args.threads} threads, median of {args.rounds} interleaved rounds")
    print("| method | train step s | ratio | spread | inference s | ratio | spread | train memory MB | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    ratios = {}
    for s in specs:
        t, i = statistics.median(times[s]), statistics.median(inf[s])
        sp_t = (max(times[s]) - min(times[s])) / t
        sp_i = (max(inf[s]) - min(inf[s])) / i
        r = ratios[s] = {"train": t / base_t, "inference": i / base_i, "memory": mem[s] / base_m}
        print(f"| {s} | {t:.2f} | {r['train']:.2f} | ±{50 * sp_t:.0f}% | {i:.2f} | {r['inference']:.2f} "
              f"| ±{50 * sp_i:.0f}% | {mem[s] / 2**20:.0f} | {r['memory']:.2f} |")
    rows = verdict(ratios)
    if rows:
        setting = "" if all(getattr(args, k) == v for k, v in TARGET_SETTING.items()) else (
            f" (set for {' '.join(f'--{k} {v}' for k, v in TARGET_SETTING.items())}, not this run's)")
        print(f"\nIssue 6 targets{setting}: ratio to mtl_full at most; memory as counted above (`mtbench profile` "
              "measures the whole peak)")
        print("| method | quantity | ratio | target | met |")
        print("|---|---|---|---|---|")
        for spec, quantity, ratio, target, met in rows:
            print(f"| {spec} | {quantity} | {ratio:.2f} | {target:.2f} | {'yes' if met else 'no'} |")


if __name__ == "__main__":
    main()
