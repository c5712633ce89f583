"""Frame extraction from unlabeled videos into the <Sub>/img layout."""
from __future__ import annotations

import cv2
import numpy as np
import pytest

from utils.extract_frames import even_frame_indices, frame_name, main, spread_evenly, video_of


def _write_video(path, n=10, size=(32, 24)):
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10, size)
    if not w.isOpened():
        pytest.skip("OpenCV build cannot write MJPG video")
    for i in range(n):
        w.write(np.full((size[1], size[0], 3), i * 20, np.uint8))
    w.release()


def test_even_frame_indices():
    assert even_frame_indices(100, 4) == [12, 37, 62, 87]  # segment middles, no first/last frame
    assert even_frame_indices(3, 5) == [0, 1, 2]            # short video: all frames
    assert even_frame_indices(7, 0) == list(range(7))       # 0 = all
    assert even_frame_indices(0, 4) == []
    for n, k in [(17, 16), (1000, 16), (16, 16), (31, 7)]:
        idx = even_frame_indices(n, k)
        assert len(idx) == k and len(set(idx)) == k and idx == sorted(idx) and 0 <= idx[0] and idx[-1] < n
        gaps = np.diff(idx)
        assert gaps.max() - gaps.min() <= 1  # evenly spread


def test_every_num_resume_and_bad_video(tmp_path, capsys):
    vids = tmp_path / "videos"
    vids.mkdir()
    _write_video(vids / "patient_1_L1.avi")
    (vids / "broken.mp4").write_bytes(b"not a video")
    out = tmp_path / "train"
    r = main(["--videos", str(vids), "--out_dir", str(out), "--sub", "LUS", "--every", "3"])
    img = out / "LUS" / "img"
    assert sorted(p.name for p in img.glob("*.png")) == [f"patient_1_L1_f{i:05d}.png" for i in (0, 3, 6, 9)]
    assert r["written"] == 4 and r["bad"] == [str(vids / "broken.mp4")]
    assert "skipping unreadable video" in capsys.readouterr().err
    frame = cv2.imread(str(img / "patient_1_L1_f00003.png"))
    assert frame.shape == (24, 32, 3) and abs(int(frame.mean()) - 60) <= 3  # the right frame
    again = main(["--videos", str(vids), "--out_dir", str(out), "--sub", "LUS", "--every", "3"])
    assert again["written"] == 0                                    # resumable
    r = main(["--videos", str(vids / "patient_1_L1.avi"), "--out_dir", str(out), "--sub", "Even",
              "--num", "3"])
    assert sorted(p.name for p in (out / "Even" / "img").glob("*.png")) == [
        f"patient_1_L1_f{i:05d}.png" for i in (1, 5, 8)]          # segment middles


def test_video_of_inverts_frame_name():
    from pathlib import Path

    for video in ("patient_6_R2.mp4", "Cov-Atlas-+(43).gif", "a_f2.avi"):
        assert video_of(Path(frame_name(Path(video), 120)).stem) == Path(video).stem
    assert video_of("Cov-Atlas-+(43)__f00002") == "Cov-Atlas-+(43)"    # the POCUS folds' frame names
    assert video_of("still_image") == "still_image"


def test_spread_evenly_keeps_both_ends():
    assert spread_evenly(list(range(10)), 4) == [0, 3, 6, 9]      # 0, 3, 6, 9 exactly
    assert spread_evenly(list(range(7)), 3) == [0, 3, 6]
    assert spread_evenly(["a", "b"], 5) == ["a", "b"] and spread_evenly([], 3) == []
