"""A-SAM checkpoints: one dict, tagged with a ``kind``, written atomically.

Keys: kind ('asam_stage1' | 'asam_stage2'), backbone, img_size, model_args, model (segmenter
state), prompt_keys, prompter_args / prompter (stage 2), epoch, best_dice, optimizer, config.
Loading the wrong kind (e.g. a stage-2 file where stage 1 is expected) is a DataError.
"""
from __future__ import annotations

import os
from typing import Any


from SAM.auto_prompter import AutoPrompter
from SAM.segmenter import PromptableSegmenter, build_segmenter
from utils.checkpoint import safe_torch_load
from utils.io import DataError, atomic_torch_save

KINDS = ("asam_stage1", "asam_stage2")


def save_checkpoint(path: str | os.PathLike, kind: str, segmenter: PromptableSegmenter,
                    prompt_keys: list[str], prompter: AutoPrompter | None = None,
                    **extra: Any) -> None:
    assert kind in KINDS
    ck = {"kind": kind, "backbone": segmenter.backbone, "img_size": segmenter.img_size,
          "model_args": getattr(segmenter, "model_args", {}), "model": segmenter.state_dict(),
          "prompt_keys": list(prompt_keys), **extra}
    if prompter is not None:
        ck["prompter_args"] = prompter.config
        ck["prompter"] = prompter.state_dict()
    atomic_torch_save(ck, path)


def load_checkpoint(path: str | os.PathLike, kinds: tuple[str, ...]) -> dict:
    """Read an A-SAM checkpoint whose kind is one of ``kinds``."""
    ck = safe_torch_load(path, "A-SAM checkpoint")
    kind = ck.get("kind") if isinstance(ck, dict) else None
    if kind not in kinds:
        found = f"a '{kind}' checkpoint" if kind else "not an A-SAM checkpoint (no 'kind' field)"
        raise DataError(f"{path}: {found}; expected kind {' or '.join(kinds)}")
    return ck


def segmenter_from_checkpoint(ck: dict) -> PromptableSegmenter:
    """Rebuild the segmenter of a checkpoint (no SAM / LiteMedSAM file needed: weights inside)."""
    if ck["backbone"] == "lite":
        seg = build_segmenter("lite", ck["img_size"])  # bundled weights, then overwritten
    else:
        seg = build_segmenter(ck["backbone"], ck["img_size"], model_args=ck.get("model_args"),
                              random_init=True)
    seg.load_state_dict(ck["model"])
    return seg


def prompter_from_checkpoint(ck: dict) -> AutoPrompter:
    if "prompter" not in ck:
        raise DataError(f"a '{ck.get('kind')}' checkpoint has no auto-prompter (stage 2 writes one)")
    # checkpoints written before keep_identity / the presence head existed have the old layout
    p = AutoPrompter(**{"keep_identity": False, "presence": False, **ck["prompter_args"]})
    p.load_state_dict(ck["prompter"])
    return p
