#!/usr/bin/env python
"""Frames of unlabeled ultrasound videos -> ``dataset/train/<Sub>/img/<video>_f<idx>.png``.

    python utils/extract_frames.py --videos ../shared/data/covid_blues/lus_videos \\
        --out_dir dataset/train --sub COVID-BLUES --every 10
    python utils/extract_frames.py --videos ../shared/data/pocus/data/pocus_videos \\
        --out_dir dataset/train --sub POCUS --num 8

Every k-th frame (``--every k``, frames 0, k, 2k, ...) or N evenly spaced frames per video
(``--num N``: the middle frame of each of N equal segments, so ``--num 1`` takes the middle
frame, and a video's first and last frames, often fades, are avoided). ``<idx>`` is the
frame index in the video (zero-padded to 5 digits). Videos are read with OpenCV to the end
(``CAP_PROP_FRAME_COUNT`` is unreliable for some containers); a video OpenCV cannot open
or decode is reported and skipped.
Resumable: writes are atomic and a video whose frames all exist is not decoded again
(``.done_<video>`` marker next to the frames). This is the layout
``SAM/infer_masks.py`` and ``utils/generate_masks_pkls.py`` read.
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import cv2
import numpy as np

if __package__ in (None, ""):  # run as a script: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.io import atomic_write, atomic_write_png  # noqa: E402

VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mpg", ".mpeg", ".mkv", ".gif", ".wmv", ".m4v")


def even_frame_indices(num_frames: int, k: int) -> list[int]:
    """``k`` frame indices spread evenly over a video of ``num_frames`` frames.

    The video is cut into ``k`` equal segments and the middle frame of each is taken,
    so first and last frames (often fades or annotations) are avoided. A video shorter
    than ``k`` gives all its frames. ``k <= 0`` also means all frames.
    """
    if num_frames <= 0:
        return []
    if k <= 0 or num_frames <= k:
        return list(range(num_frames))
    return [int((i + 0.5) * num_frames / k) for i in range(k)]


def read_frames(path: Path):
    """Yield (index, BGR frame) for every decodable frame; nothing if the video won't open."""
    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            return
        i = 0
        while True:
            ok, frame = cap.read()
            if not ok or frame is None:
                return
            yield i, frame
            i += 1
    finally:
        cap.release()


def spread_evenly(items: list, k: int) -> list:
    """``k`` items spread evenly over ``items``, the first and the last included (all of them
    when there are no more than ``k``): for sampling videos from a list, or frames of a video
    already on disk. :func:`even_frame_indices` is the extraction's rule (ends avoided)."""
    if not items:
        return []
    idx = np.unique(np.linspace(0, len(items) - 1, min(k, len(items))).round().astype(int))
    return [items[i] for i in idx]


def count_frames(path: Path) -> int:
    return sum(1 for _ in read_frames(path))


def frame_name(video: Path, idx: int) -> str:
    return f"{video.stem}_f{idx:05d}.png"


def video_of(frame_stem: str) -> str:
    """The video a frame file came from: ``<video>_f<index>`` (also POCUS's ``<video>__f<index>``)
    -> ``<video>``; a name of another form is its own video."""
    m = re.match(r"^(.*?)_+f\d+$", frame_stem)
    return m.group(1) if m else frame_stem


def extract_video(video: Path, img_dir: Path, every: int = 0, num: int = 0) -> int:
    """Write the chosen frames of one video; returns how many were written now.

    Raises:
        ValueError: the video cannot be opened or holds no decodable frame.
    """
    marker = img_dir / f".done_{video.stem}"
    if marker.is_file():
        return 0
    if num:
        n = count_frames(video)  # a full decode pass: the container's frame count may lie
        if n == 0:
            raise ValueError(f"{video}: cannot be opened or has no decodable frames")
        wanted = set(even_frame_indices(n, num))
    written, seen = 0, 0
    for idx, frame in read_frames(video):
        seen += 1
        if (num and idx in wanted) or (every and idx % every == 0):
            out = img_dir / frame_name(video, idx)
            if not out.is_file():
                atomic_write_png(frame, out)
                written += 1
    if seen == 0:
        raise ValueError(f"{video}: cannot be opened or has no decodable frames")
    atomic_write(marker, lambda f: f.write(b"done\n"))
    return written


def find_videos(sources: list[str]) -> list[Path]:
    videos = []
    for s in sources:
        p = Path(s)
        if p.is_dir():
            videos += [f for f in sorted(p.rglob("*")) if f.suffix.lower() in VIDEO_EXTS and f.is_file()]
        elif p.is_file():
            videos.append(p)
        else:
            raise SystemExit(f"{p}: no such file or folder")
    return videos


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", nargs="+", required=True, help="video files or folders (searched recursively)")
    p.add_argument("--out_dir", default="dataset/train", help="root of the <Sub>/img layout")
    p.add_argument("--sub", required=True, help="sub-dataset name, e.g. COVID-BLUES")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--every", type=int, help="keep every k-th frame (0, k, 2k, ...)")
    g.add_argument("--num", type=int, help="keep N evenly spaced frames per video")
    args = p.parse_args(argv)
    if (args.every is not None and args.every < 1) or (args.num is not None and args.num < 1):
        p.error("--every / --num must be >= 1")
    img_dir = Path(args.out_dir) / args.sub / "img"
    videos = find_videos(args.videos)
    names = [v.stem for v in videos]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:  # frames are named after the video stem: two videos must not share one
        raise SystemExit(f"videos with the same name would overwrite each other's frames: {dup[:5]}")
    bad, written = [], 0
    for v in videos:
        try:
            written += extract_video(v, img_dir, every=args.every or 0, num=args.num or 0)
        except ValueError as e:
            print(f"skipping unreadable video: {e}", file=sys.stderr)
            bad.append(str(v))
    print(f"{len(videos)} videos, {written} frames written to {img_dir}, {len(bad)} unreadable skipped")
    return {"videos": len(videos), "written": written, "bad": bad}


if __name__ == "__main__":
    main()
