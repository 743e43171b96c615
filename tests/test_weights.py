"""Loading backbone weights from local checkpoints in timm and original (Microsoft) Swin format."""

from __future__ import annotations

import re

import pytest
import torch
from timm.models.swin_transformer import SwinTransformer

from mtbench.errors import MtbenchError
from mtbench.swin import EMBEDDED_SWIN_ARGS, create_backbone


def _reference_model(seed: int = 1) -> SwinTransformer:
    torch.manual_seed(seed)
    return SwinTransformer(img_size=64, num_classes=10, **EMBEDDED_SWIN_ARGS)


def _to_original_layout(state: dict) -> dict:
    """timm keys -> the original Swin repo's: PatchMerging at the end of stage i (``layers.{i}.downsample``), the
    classifier as ``head.weight``, everything wrapped in ``{"model": ...}``."""
    out = {}
    for k, v in state.items():
        k = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m.group(1)) - 1}.downsample", k)
        out[k.replace("head.fc.", "head.")] = v
    return {"model": out}


def _assert_same_backbone(backbone, model):
    ref = {k.replace("layers.", "stages.", 1): v for k, v in model.state_dict().items()
           if not k.startswith(("head", "norm."))}
    ours = backbone.state_dict()
    assert set(ref) == set(ours)
    for k, v in ref.items():
        assert torch.equal(ours[k], v), k


def test_timm_format_pth(tmp_path):
    model = _reference_model()
    path = tmp_path / "swin_timm.pth"
    torch.save(model.state_dict(), path)
    _assert_same_backbone(create_backbone("swin_embedded", weights=path), model)


def test_original_swin_format(tmp_path):
    model = _reference_model(2)
    state = _to_original_layout(model.state_dict())
    assert "layers.0.downsample.reduction.weight" in state["model"]
    path = tmp_path / "swin_original.pth"
    torch.save(state, path)
    _assert_same_backbone(create_backbone("swin_embedded", weights=path), model)


def test_safetensors_checkpoint(tmp_path):
    from safetensors.torch import save_file

    model = _reference_model(3)
    path = tmp_path / "swin.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    _assert_same_backbone(create_backbone("swin_embedded", weights=path), model)


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    with pytest.raises(MtbenchError, match="weights file not found"):
        create_backbone("swin_embedded", weights=tmp_path / "missing.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(MtbenchError, match="cannot read checkpoint"):
        create_backbone("swin_embedded", weights=junk)
    text = tmp_path / "passwd.pth"  # torch.load says "list index out of range" here: never shown
    text.write_text("root:x:0:0:root:/root:/bin/bash\n")
    with pytest.raises(MtbenchError, match=r"^cannot read checkpoint .*: not a tensor state dict that "
                                           r"torch\.load\(weights_only=True\) reads \(a timm"):
        create_backbone("swin_embedded", weights=text)
    import pickle

    code = tmp_path / "code.pth"  # a pickle that is not a tensor state dict: refused, and no advice to load it unsafely
    code.write_bytes(pickle.dumps(pytest.approx, protocol=2))
    with pytest.raises(MtbenchError) as e:
        create_backbone("swin_embedded", weights=code)
    assert str(e.value) == (f"cannot read checkpoint {str(code)!r}: not a tensor state dict that "
                            "torch.load(weights_only=True) reads (a timm or original Swin .pth, .bin or .safetensors)")
    small = tmp_path / "small.pth"
    torch.save(_reference_model().state_dict(), small)
    with pytest.raises(MtbenchError, match="lacks|has shape|does not fit"):
        create_backbone("swin_tiny_patch4_window7_224", weights=small)
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in _reference_model().state_dict().items() if "layers.3" not in k}, partial)
    with pytest.raises(MtbenchError, match="lacks"):
        create_backbone("swin_embedded", weights=partial)


def test_swin_t_timm_checkpoint_at_448(tmp_path):
    """A Swin-T checkpoint saved at 224 (window 7) loads into the 448 backbone of the papers' setting."""
    import timm

    torch.manual_seed(0)
    src = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    path = tmp_path / "swin_tiny_patch4_window7_224.pth"
    torch.save(src.state_dict(), path)
    backbone = create_backbone("swin_tiny_patch4_window7_224", weights=path)
    assert backbone.img_size == (448, 448)
    assert torch.equal(backbone.stages[2].blocks[3].attn.qkv.weight, src.layers[2].blocks[3].attn.qkv.weight)
    assert torch.equal(backbone.stages[1].downsample.reduction.weight, src.layers[1].downsample.reduction.weight)
