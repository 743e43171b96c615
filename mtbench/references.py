"""Single-task references for Δm on the embedded dataset, measured by mtbench's own ``single_task`` runs.

``write_references`` averages the primary test metrics of ``results/{dataset}/single_task/default/seed*.json`` and
stores them, with how they were produced (result files, seeds, recipe, git commit, date), in
``mtbench/assets/single_task_references.json``, which :func:`mtbench.results.load_references` reads.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path

from mtbench.errors import MtbenchError
from mtbench.results import REFERENCE_FILE, atomic_write_text, load_results


def write_references(results_dir: str | Path, dataset: str, out: Path = REFERENCE_FILE) -> tuple[Path, dict]:
    """Average the dataset's default ``single_task`` results into the reference file.

    Returns:
        ``(path written, the dataset's entry)``.

    Raises:
        MtbenchError: no ``single_task`` result for the dataset.
    """
    from mtbench.identity import identity_of

    runs = [(p, r) for p, r in load_results(results_dir, dataset)
            if r.run.method == "single_task" and identity_of(r).path_key() == "default"]
    if not runs:
        raise MtbenchError(f"no single_task results for dataset {dataset!r} under {str(results_dir)!r}; run "
                           f"`mtbench run --methods single_task --dataset {dataset}` first")
    tasks = runs[0][1].run.tasks
    primary = {t: sum(r.primary[t] for _, r in runs) / len(runs) for t in tasks}
    first = runs[0][1]
    entry = {
        "primary": {t: round(v, 4) for t, v in primary.items()},
        "source": f"mtbench single_task, {len(runs)} seed(s), default recipe",
        "produced_by": (f"mtbench run --methods single_task --dataset {dataset} --results-dir {results_dir}; "
                        f"mtbench references --dataset {dataset} --results-dir {results_dir}"),
        "seeds": [r.run.seed for _, r in runs],
        "result_files": [str(p) for p, _ in runs],
        "recipe": first.train.recipe,
        "init": first.run.init,
        "identity": identity_of(first).model_dump(mode="json"),
        "git_commit": first.run.git_commit,
        "metrics": {t: first.metrics[t] for t in tasks} if len(runs) == 1 else None,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    data = json.loads(out.read_text()) if out.is_file() else {}
    data[dataset] = entry
    atomic_write_text(out, json.dumps(data, indent=2) + "\n")
    return out, entry
