"""The models reproduce the eval-mode outputs recorded before the core's seams were introduced (issue 6).

``tests/fixtures/recorded_outputs.safetensors`` was written by ``tests/fixtures/record_outputs.py`` on the pre-seams
code (commit e0dfd78): fixed weights (a function of each parameter's name), one fixed 64x64 image, three tasks,
``swin_embedded`` with its packaged weights. :func:`old_name` maps today's parameter names to the recorded ones.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

FIXTURES = Path(__file__).parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
import record_outputs as rec  # noqa: E402

RECORDED = load_file(str(rec.OUT))
NAMES = json.loads(rec.NAMES_OUT.read_text())


def old_name(name: str) -> str:
    """Today's parameter name -> the name it had when the outputs were recorded."""
    return name


@pytest.mark.parametrize("spec", rec.SPECS)
def test_recorded_eval_outputs(spec):
    model = rec.build(spec)
    filled = rec.fill_weights(model, old_name)
    assert filled == NAMES[spec]  # the same parameters, under the same (mapped) names
    out = rec.outputs(model)
    assert set(out) == {k.split("|", 1)[1] for k in RECORDED if k.startswith(spec + "|")}
    for k, v in out.items():
        ref = RECORDED[f"{spec}|{k}"]
        assert v.shape == ref.shape, k
        assert (v - ref).abs().max().item() <= 1e-6, (k, (v - ref).abs().max().item())
