"""Stage 3: prompt-free A-SAM masks for unlabeled images (missing upstream).

    python SAM/infer_masks.py --ckpt runs/asam_stage2/best.pt --data_dir dataset/train
    torchrun --nproc_per_node 4 SAM/infer_masks.py --ckpt ... --data_dir dataset/train

reads ``<data_dir>/<Sub>/img/**/<name>.<png|jpg|...>`` and writes
``<out_dir>/<Sub>/label/**/<name>.png`` (out_dir defaults to data_dir): uint8 index maps at
each image's own size, 0 = background and k = the k-th prompt of ``--prompts`` (default: all
anatomies the checkpoint knows; the mapping goes to ``<out_dir>/asam_classes.json``). The
layout is ``utils/mask_layout.py``'s (:func:`~utils.mask_layout.label_jobs`), which
``utils/generate_masks_pkls.py`` reads.

* batched: one encoder and one prompter pass per batch; one decoder pass for every
  (image, anatomy) of the batch (:func:`SAM.fast_decoder.predict_index_maps`: the SAM
  decoder's arithmetic re-associated so that the 4096 image tokens are never projected, and
  the mask upscaled only inside the letterboxed content); label maps are written by a
  background thread;
* resumable: a label that exists is complete (writes are atomic) and is skipped;
* sharded: under torchrun each process takes every WORLD_SIZE-th file from RANK on
  (no process group is needed); a plain run is rank 0 of 1;
* quality filter: every mask's predicted IoU (SAM's IoU head) and stability score (agreement
  of the mask at logits ±1 around the threshold) go to ``<label>.scores.json`` beside each
  label map; ``--min_pred_iou`` / ``--min_stability`` (off by default; SAM's automatic mask
  generator uses 0.88 / 0.95) leave a failing mask out of the map, and the run reports how
  many masks each filter removed;
* presence: a prompt judged absent marks nothing on that image: the decision stage 2 fitted on
  its validation split (stored in the checkpoint: per prompt, weights of the head's logit,
  SAM's predicted IoU and the mask's highest probability and area, and a threshold on their
  sum; ``--presence off`` or a number overrides it); the scores and the decision go to
  ``.scores.json``, and
  ``asam_counts_rank<R>.json`` holds how many masks the decision removed and the share of
  images on which each prompt keeps a region;
* one meaning per folder: the settings that shape a label map (checkpoint digest, prompts,
  threshold, quality filter) go to ``<out_dir>/asam_settings.json``; a re-run with other
  settings, or on label maps this stage did not write (a SAMUS set's ground truth), is refused
  in one line before any masking; ``--overwrite`` redoes every label map of the folder;
* a bad image is reported (stderr and ``bad_images_rank<R>.txt``) and skipped;
* rank 0 writes an overlay montage PNG of the first images it masks (``--montage``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

_HERE = Path(__file__).resolve().parent
if str(_HERE.parent) not in sys.path:  # run as a script: the repo root must be importable
    sys.path.insert(0, str(_HERE.parent))
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from tqdm import tqdm  # noqa: E402

from SAM.checkpoint import load_checkpoint, prompter_from_checkpoint, segmenter_from_checkpoint  # noqa: E402
from SAM.fast_decoder import predict_index_maps  # noqa: E402
from SAM.presence import PresenceRule, presence_rule  # noqa: E402
from SAM.samus_data import image_to_tensor  # noqa: E402
from SAM.seg_training import pick_device, run_as_script  # noqa: E402
from utils.flags import AT_LEAST_0, AT_LEAST_1, PROBABILITY, check_flag_ranges, script_parser  # noqa: E402
from utils.io import DataError, atomic_write, atomic_write_png, ensure_writable_dir, read_image  # noqa: E402
from utils.mask_layout import ensure_label_dirs, label_jobs  # noqa: E402
from utils.plots import montage, overlay_labels  # noqa: E402

SETTINGS_NAME = "asam_settings.json"   # what made the label maps of an out_dir
CLASSES_NAME = "asam_classes.json"     # label index -> prompt key


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def label_settings(ckpt_sha256: str, prompts: list[str], args: argparse.Namespace,
                   presence: PresenceRule | None = None) -> dict:
    """Everything that decides the content of a label map (not batch size, workers, device);
    ``presence``: the presence decision of the prompts (None: none; a folder written before the
    decision existed reads as None)."""
    out = {"checkpoint_sha256": ckpt_sha256, "prompts": list(prompts), "threshold": args.threshold,
           "min_pred_iou": args.min_pred_iou, "min_stability": args.min_stability}
    if presence is not None:
        out["presence"] = presence.settings()
    if args.encoder_precision != "fp32":                    # absent for fp32: folders of before it read alike
        out["encoder_precision"] = args.encoder_precision
    return out


#: --encoder_precision -> the autocast type of the image encoder (None: float32, no autocast)
ENCODER_DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def parse_presence(value: str) -> str | float:
    """--presence: 'checkpoint', 'off' or a number (one threshold for every prompt)."""
    if value in ("checkpoint", "off"):
        return value
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{value}': expected checkpoint, off or a number") from None


def presence_decision(ck: dict, prompts: list[str], choice: str | float) -> tuple[PresenceRule | None, str]:
    """The presence decision of ``prompts`` for a --presence choice, and a line saying which."""
    if choice == "off":
        return None, "presence decision off (--presence off): every prompt marks what it finds"
    if not isinstance(choice, str):
        return (presence_rule(ck.get("presence"), prompts, choice),
                f"presence threshold {choice:g} for every prompt (--presence), on its decided value")
    record = ck.get("presence")
    if record is None:
        return None, ("the checkpoint has no presence thresholds (trained before the presence head, or with "
                      "--presence_weight 0): every prompt marks what it finds")
    return presence_rule(record, prompts), f"presence decision of the checkpoint: {record['rule']}"


def settings_conflict(old: dict | None, old_classes: dict | None, new: dict, labels_exist: bool) -> str | None:
    """Why label maps already in a folder cannot be kept for a run with settings ``new``, or None.

    ``old``: the folder's ``asam_settings.json``; ``old_classes``: its ``asam_classes.json``
    (folders of an earlier version have only that one, so only the prompts can be compared)."""
    if not labels_exist:
        return None
    if old is not None:
        # keys of either side: a folder decided by an older rule ("presence_thresholds") is not one
        # written without a decision, nor one of the rule of today ("presence")
        differ = [k for k in [*new, *(k for k in old if k not in new)] if old.get(k) != new.get(k)]
        if not differ:
            return None
        return "; ".join(f"{k} was {old.get(k, 'not set')!r}, now {new.get(k, 'not set')!r}" for k in differ)
    if old_classes is not None:
        before = [old_classes[k] for k in sorted(old_classes, key=int)]
        return None if before == new["prompts"] else f"prompts were {before!r}, now {new['prompts']!r}"
    return f"label maps are there that this stage did not write (no {SETTINGS_NAME})"


def shard(items: list, rank: int, world: int) -> list:
    """Every ``world``-th item from ``rank`` on: disjoint shards that cover the list."""
    return items[rank::world]


class ImageFiles(Dataset):
    """Image paths -> (3, S, S) float tensors in [0, 1]; unreadable files come back as errors."""

    def __init__(self, paths: list[Path], img_size: int):
        self.paths, self.img_size = paths, img_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            img = read_image(self.paths[i], "rgb")
        except DataError as e:
            return i, None, str(e)
        x, valid = image_to_tensor(img, self.img_size)
        return i, (x, valid), img


def _collate(items):
    return items  # variable-size originals and error strings: keep a plain list


class BackgroundWriter:
    """Writes label PNGs on one background thread (PNG encoding releases the GIL), at most
    ``pending`` queued; the first failure is raised by :meth:`close` or the next :meth:`put`."""

    def __init__(self, pending: int = 16):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="png-writer")
        self._futures: list[Future] = []
        self._pending = pending

    def put(self, image: np.ndarray, path: Path) -> None:
        self._futures.append(self._pool.submit(atomic_write_png, image, path))
        while len(self._futures) > self._pending:
            self._futures.pop(0).result()
        done = [f for f in self._futures if f.done()]
        for f in done:
            self._futures.remove(f)
            f.result()

    def close(self) -> None:
        try:
            for f in self._futures:
                f.result()
        finally:
            self._pool.shutdown(wait=True)


def default_workers() -> int:
    """Image-reading processes: reading + letterboxing costs ~1 ms per image against seconds
    for the encoder on a CPU, so one worker on a small machine (more would only take cores
    from torch), a few on a large one (GPU inference, large frames)."""
    cpus = os.cpu_count() or 1
    return 1 if cpus <= 4 else min(4, cpus // 4)


def _mask_all(loader: DataLoader, seg, prompter, prompt_ids: list[int],
              todo: list[tuple[Path, Path]], writer: BackgroundWriter, device: torch.device,
              args: argparse.Namespace, rank: int, bad: list[str], removed: dict[str, int],
              presence: PresenceRule | None, regions: list[int]) -> tuple[int, list[np.ndarray]]:
    """Mask every batch of ``loader``; bad images go to ``bad``, filter counts to ``removed``,
    the number of maps holding a region of prompt k to ``regions[k]``. -> (written, montage tiles)."""
    tiles, written = [], 0
    for items in tqdm(loader, desc=f"A-SAM masks (rank {rank})", dynamic_ncols=True):
        good = []
        for i, x, orig in items:
            if x is None:
                print(f"skipping bad image: {orig}", file=sys.stderr)
                bad.append(orig)
            else:
                good.append((i, x, orig))
        if not good:
            continue
        images = torch.stack([x for _, (x, _), _ in good]).to(device)
        maps, scores = predict_index_maps(seg, prompter, images, prompt_ids, [v for _, (_, v), _ in good],
                                          [o.shape[:2] for _, _, o in good], args.threshold,
                                          args.min_pred_iou, args.min_stability, return_scores=True,
                                          presence=presence, encoder_dtype=ENCODER_DTYPES[args.encoder_precision])
        for (i, _, orig), lab, per_prompt in zip(good, maps, scores):
            for k, s in enumerate(per_prompt):
                removed["masks"] += 1
                removed["pred_iou"] += args.min_pred_iou is not None and s["pred_iou"] < args.min_pred_iou
                removed["stability"] += args.min_stability is not None and s["stability"] < args.min_stability
                removed["presence"] += not s.get("present", True)
                removed["either"] += not s["kept"]
            present = np.bincount(lab.ravel(), minlength=len(per_prompt) + 1)[1:] > 0
            for k, has in enumerate(present):
                regions[k] += int(has)
            record = {str(k + 1): s for k, s in enumerate(per_prompt)}  # keys as asam_classes.json
            # before the label: the label is the completion mark a resumed run trusts
            atomic_write(todo[i][1].with_suffix(".scores.json"), lambda f, r=record: f.write(json.dumps(r).encode()))
            writer.put(lab, todo[i][1])
            written += 1
            if rank == 0 and len(tiles) < args.montage_n:
                tiles.append(overlay_labels(orig, lab, outline=True))
    return written, tiles


def parse_args(argv=None) -> argparse.Namespace:
    p = script_parser(__doc__)
    p.add_argument("--ckpt", required=True, help="stage-2 checkpoint (kind asam_stage2)")
    p.add_argument("--data_dir", required=True, help="folder with <Sub>/img/ sub-folders")
    p.add_argument("--out_dir", default=None, help="where <Sub>/label/ goes (default: --data_dir)")
    p.add_argument("--prompts", default=None,
                   help="comma-separated prompt keys '<Dataset>/<class ID>' in output-index order "
                        "(default: all of the checkpoint). Stage 2 never shows a prompt images of "
                        "another dataset, so restrict this to the anatomies of the corpus at hand "
                        "(e.g. FetalHead-HC18/1): a foreign prompt still fires")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--workers", type=int, default=None,
                   help="image-reading processes (default: 1 on machines with <= 4 CPUs, else "
                        "min(4, CPUs / 4); 0 = read in the main process)")
    p.add_argument("--threshold", type=float, default=0.5, help="probability for foreground")
    for flag, score, sam_default in (("--min_pred_iou", "predicted IoU", 0.88),
                                     ("--min_stability", "stability score", 0.95)):
        p.add_argument(flag, type=float, default=None,
                       help=f"leave out masks whose {score} is below this (off by default; SAM's automatic "
                            f"mask generator: {sam_default})")
    p.add_argument("--presence", type=parse_presence, default="checkpoint",
                   help="checkpoint (default): a prompt that the decision stage 2 fitted on its "
                        "validation split judges absent marks nothing; off: no decision; a number: that "
                        "threshold for every prompt, on its decided value (the presence logit where the "
                        "checkpoint fitted no weights for it)")
    p.add_argument("--encoder_precision", choices=sorted(ENCODER_DTYPES), default="fp32",
                   help="fp32 (default) or bf16: the image encoder under bfloat16 autocast (faster on CPUs "
                        "with bf16 units and on GPUs; the label maps differ a little: "
                        "docs/results/infer_precision_cpu.json)")
    p.add_argument("--montage", default=None,
                   help="overlay montage PNG (default <out_dir>/asam_montage.png; 'none' to skip)")
    p.add_argument("--montage_n", type=int, default=16, help="images in the montage")
    p.add_argument("--overwrite", action="store_true",
                   help=f"redo every label map of this folder (for one made with other settings, "
                        f"see {SETTINGS_NAME}, or not by this stage) instead of refusing")
    p.add_argument("--device", default=None, help="default: cuda:<LOCAL_RANK> if available, else cpu")
    return p.parse_args(argv)


#: checked before any work (utils/flags.py); a filter above 1 removes every mask, on purpose
FLAG_RANGES = {"--batch_size": AT_LEAST_1, "--workers": AT_LEAST_0, "--threshold": PROBABILITY,
               "--min_pred_iou": AT_LEAST_0, "--min_stability": AT_LEAST_0, "--montage_n": AT_LEAST_0}


def main(argv=None) -> dict:
    args = parse_args(argv)
    check_flag_ranges(args, FLAG_RANGES)
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = pick_device(args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
                                         if torch.cuda.is_available() else "cpu"))
    data_dir = Path(args.data_dir)
    out_dir = Path(args.out_dir) if args.out_dir else data_dir
    if args.out_dir or data_dir.is_dir():  # a missing --data_dir is reported below, not created
        ensure_writable_dir(out_dir, "--out_dir" if args.out_dir else "--data_dir (the labels go there)")
    ck = load_checkpoint(args.ckpt, ("asam_stage2",))
    seg, prompter = segmenter_from_checkpoint(ck).to(device).eval(), prompter_from_checkpoint(ck).to(device).eval()
    keys = ck["prompt_keys"]
    wanted = args.prompts.split(",") if args.prompts else keys
    unknown = [k for k in wanted if k not in keys]
    if unknown:
        raise SystemExit(f"prompts {unknown} unknown to {args.ckpt}; it knows {keys}")
    prompt_ids = [keys.index(k) for k in wanted]

    if args.presence != "off" and not isinstance(args.presence, str) and prompter.presence_head is None:
        raise SystemExit(f"--presence {args.presence:g}: {args.ckpt} has no presence head (trained before it "
                         "existed, or with --presence_weight 0)")
    presence, presence_note = presence_decision(ck, wanted, args.presence)

    jobs = label_jobs(data_dir, out_dir)
    if not jobs:
        raise SystemExit(f"no images under {data_dir}/<Sub>/img/")
    settings = label_settings(file_sha256(args.ckpt), wanted, args, presence)
    read = lambda name: json.loads((out_dir / name).read_text()) if (out_dir / name).is_file() else None  # noqa: E731
    mine = shard(jobs, rank, world)
    conflict = settings_conflict(read(SETTINGS_NAME), read(CLASSES_NAME), settings,
                                 any(label.is_file() for _, label in jobs))
    if conflict and not args.overwrite:
        raise DataError(f"{out_dir / SETTINGS_NAME}: {conflict}; one folder holds label maps of one meaning: "
                        "use another --out_dir, or --overwrite to redo these label maps")
    if args.overwrite:  # each rank removes its own shard's maps (shards are disjoint)
        for _, label in mine:
            label.unlink(missing_ok=True)
            label.with_suffix(".scores.json").unlink(missing_ok=True)
        print(f"rank {rank}: --overwrite: redoing the {len(mine)} label maps of this shard"
              + (f" ({conflict})" if conflict else ""))
    ensure_label_dirs(mine)
    todo = [j for j in mine if not j[1].is_file()]
    # every rank writes the same two files before its first label, so that a rank starting
    # late finds its peers' label maps explained
    mapping = {str(i + 1): k for i, k in enumerate(wanted)}
    atomic_write(out_dir / CLASSES_NAME, lambda f: f.write(json.dumps(mapping, indent=1).encode()))
    atomic_write(out_dir / SETTINGS_NAME, lambda f: f.write(json.dumps(settings, indent=1).encode()))
    print(f"rank {rank}/{world}: {len(mine)} images in shard, {len(mine) - len(todo)} done before, "
          f"{len(todo)} to mask with prompts {wanted}; {presence_note}")

    workers = default_workers() if args.workers is None else args.workers
    loader = DataLoader(ImageFiles([j[0] for j in todo], seg.img_size), batch_size=args.batch_size,
                        num_workers=workers, collate_fn=_collate)
    bad: list[str] = []
    removed = {"masks": 0, "pred_iou": 0, "stability": 0, "presence": 0, "either": 0}
    regions = [0] * len(wanted)
    writer = BackgroundWriter()
    t0 = time.perf_counter()
    try:
        written, tiles = _mask_all(loader, seg, prompter, prompt_ids, todo, writer, device, args,
                                   rank, bad, removed, presence, regions)
    finally:
        writer.close()
    seconds = time.perf_counter() - t0
    if bad:
        atomic_write(out_dir / f"bad_images_rank{rank}.txt", lambda f: f.write("\n".join(bad).encode() + b"\n"))
    if rank == 0 and tiles and (args.montage or "").lower() != "none":
        path = Path(args.montage) if args.montage else out_dir / "asam_montage.png"
        atomic_write_png(cv2.cvtColor(montage(tiles), cv2.COLOR_RGB2BGR), path)
        print(f"montage: {path}")
    rate = written / seconds if seconds > 0 and written else 0.0
    print(f"rank {rank}: wrote {written} label maps in {seconds:.1f} s ({rate:.3f} images/s); "
          f"{len(bad)} bad images skipped")
    if args.min_pred_iou is not None or args.min_stability is not None or presence is not None:
        print(f"rank {rank}: filters removed {removed['either']} of {removed['masks']} masks "
              f"(predicted IoU < {args.min_pred_iou}: {removed['pred_iou']}, "
              f"stability < {args.min_stability}: {removed['stability']}, "
              f"judged absent: {removed['presence'] if presence is not None else 'off'})")
    share = {k: round(n / written, 4) if written else None for k, n in zip(wanted, regions)}
    print(f"rank {rank}: share of images keeping a region, per prompt: {share}")
    counts = {"written": written, "removed": removed, "images_with_region": dict(zip(wanted, regions)),
              "share_with_region": share, "presence": presence_note}
    atomic_write(out_dir / f"asam_counts_rank{rank}.json", lambda f: f.write(json.dumps(counts, indent=1).encode()))
    return {"written": written, "skipped_existing": len(mine) - len(todo), "bad": bad,
            "seconds": seconds, "images_per_s": rate, "removed": removed, "presence": presence_note,
            "images_with_region": dict(zip(wanted, regions)), "share_with_region": share}


if __name__ == "__main__":
    sys.exit(run_as_script(main, "infer_masks.py"))
