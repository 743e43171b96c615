"""Measurement protocol shared by every command: trainable-parameter counts (#TP) and their breakdown.

No method counts itself: every number in a result file, a table or ``mtbench params`` comes from here.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

#: The counting rule, stated in every result file and printed by ``mtbench params``.
COUNTING_RULE = (
    "#TP = number of parameters with requires_grad=True after the method's structural freezing: unfrozen backbone "
    "parts + modules the method adds + all task decoders (including their 1x1 channel reducers). Buffers (BatchNorm "
    "statistics, relative-position indices) are not parameters; a parameter shared by several tasks counts once; "
    "the backbone's final LayerNorm and classifier are not part of the model."
)


@dataclass
class ParamBreakdown:
    """Parameter counts of a built model.

    Attributes:
        trainable: #TP, the sum of the three trainable groups below.
        total: all parameters of the model.
        backbone_frozen: frozen backbone parameters.
        backbone_unfrozen: trainable backbone parameters by structural role (``patch_embed``, ``norm``, ``rel_pos``,
            ``patch_merging``, ``bias``, ``weight``).
        method: parameters the method adds (LoRA, prompts, adapters, filters, gates, ...).
        decoders: task decoders.
        rule: :data:`COUNTING_RULE`.
    """

    trainable: int
    total: int
    backbone_frozen: int
    backbone_unfrozen: dict[str, int] = field(default_factory=dict)
    method: int = 0
    decoders: int = 0
    rule: str = COUNTING_RULE

    def to_dict(self) -> dict:
        return asdict(self)


def count_params(model: nn.Module) -> ParamBreakdown:
    """Count #TP and its breakdown for a :class:`mtbench.model.MultiTaskModel`.

    Raises:
        MtbenchError: a parameter of no known category (propagated from the model).
    """
    frozen = 0
    unfrozen: dict[str, int] = {}
    method = decoders = total = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        total += n
        cat, role = model.param_category(p)
        if cat == "backbone":
            if p.requires_grad:
                unfrozen[role] = unfrozen.get(role, 0) + n
            else:
                frozen += n
        elif cat == "method":
            method += n if p.requires_grad else 0
        else:
            decoders += n if p.requires_grad else 0
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == method + decoders + sum(unfrozen.values()), "breakdown does not add up"
    return ParamBreakdown(trainable, total, frozen, dict(sorted(unfrozen.items())), method, decoders)
