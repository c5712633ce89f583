"""Does the float16 embedding cache move A-SAM's masks and presence calls? fp32 against fp16-rounded.

Stage 2 (``SAM/train_auto_prompter.py``) trains and calibrates its presence decision on image
embeddings cached as float16 (``SAM/embedding_cache.py``); ``SAM/infer_masks.py`` decodes fresh
float32 ones. This script embeds each frame once, in float32, and decodes it twice with the
checkpoint's presence decision: from the embedding as it is and from the embedding rounded to
float16 (what the calibration saw). It writes how far the two label maps agree (per prompt: the
share of frames with the same presence call and the IoU where both keep a region; overall, the
share of pixels labelled alike) and how many presence decisions flip:

    python benchmarks/measure_cache_rounding.py --ckpt <lung A-SAM>/best.pt --frames <study out>/frames \\
        --prompts SynLung-Lung/1,...,SynLung-Lung/6 --n 48 --out docs/results/cache_rounding_cpu.json

It measures agreement, not time (the encoder runs once per frame for both).
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from benchmarks.bench_infer_precision import checked_frames, compare_maps, frames_parser, write_report  # noqa: E402
from benchmarks.machine import machine  # noqa: E402
from SAM.fast_decoder import predict_index_maps  # noqa: E402
from SAM.infer_masks import ImageFiles, _collate, presence_decision  # noqa: E402
from SAM.checkpoint import load_checkpoint, prompter_from_checkpoint, segmenter_from_checkpoint  # noqa: E402


def with_fixed_embedding(seg: torch.nn.Module, emb: torch.Tensor) -> torch.nn.Module:
    """A shallow copy of ``seg`` (its modules shared) whose ``embed`` returns ``emb`` whatever the input."""
    fixed = copy.copy(seg)
    fixed.embed = lambda images: emb
    return fixed


def decode_both(seg, prompter, images, prompt_ids, valid, sizes, presence):
    """The label maps and per-prompt scores of one batch from its float32 embedding and from that
    embedding rounded to float16: ((maps, scores) fp32, (maps, scores) fp16-rounded)."""
    with torch.no_grad():
        emb = seg.embed(images)
        out = []
        for e in (emb, emb.half().float()):
            out.append(predict_index_maps(with_fixed_embedding(seg, e), prompter, images, prompt_ids, valid, sizes,
                                          return_scores=True, presence=presence))
    return out[0], out[1]


def main(argv=None) -> dict:
    a = frames_parser(__doc__, "cache_rounding_cpu.json").parse_args(argv)
    frames = checked_frames(a)
    ck = load_checkpoint(a.ckpt, ("asam_stage2",))
    keys = ck["prompt_keys"]
    wanted = a.prompts.split(",") if a.prompts else keys
    unknown = [k for k in wanted if k not in keys]
    if unknown:
        raise SystemExit(f"--prompts {unknown}: unknown to {a.ckpt}; it knows {keys}")
    presence, note = presence_decision(ck, wanted, "checkpoint")
    if presence is None:
        raise SystemExit(f"--ckpt {a.ckpt}: {note}")
    seg, prompter = segmenter_from_checkpoint(ck).eval(), prompter_from_checkpoint(ck).eval()
    ids = [keys.index(k) for k in wanted]
    maps, flips, decisions = {"fp32": [], "fp16": []}, [0] * len(wanted), 0
    loader = DataLoader(ImageFiles(frames, seg.img_size), batch_size=a.batch_size, collate_fn=_collate)
    for items in loader:
        bad = [orig for _, x, orig in items if x is None]
        if bad:
            raise SystemExit(f"unreadable frame: {bad[0]}")
        images = torch.stack([x for _, (x, _), _ in items])
        (m32, s32), (m16, s16) = decode_both(seg, prompter, images, ids, [v for _, (_, v), _ in items],
                                             [o.shape[:2] for _, _, o in items], presence)
        maps["fp32"] += m32
        maps["fp16"] += m16
        for per32, per16 in zip(s32, s16):
            for k, (x, y) in enumerate(zip(per32, per16)):
                flips[k] += x["present"] != y["present"]
                decisions += 1
    agreement = compare_maps(maps["fp32"], maps["fp16"], len(wanted))
    agreement["per_prompt"] = {wanted[k - 1]: v for k, v in agreement["per_prompt"].items()}
    result = {"what": "A-SAM label maps from float32 image embeddings against the same embeddings rounded to "
                      "float16 (the stage-2 cache's type), with the checkpoint's presence decision",
              "settings": {"ckpt": Path(a.ckpt).name, "frames": len(frames), "prompts": wanted, "presence": note},
              "presence_flips": dict(zip(wanted, flips)), "presence_decisions": decisions,
              "agreement": agreement, "machine": machine()}
    write_report(result, Path(a.out), f"pixel agreement {agreement['pixel_agreement']:.5f}; presence flips "
                 f"{sum(flips)} of {decisions}")
    return result


if __name__ == "__main__":
    main()
