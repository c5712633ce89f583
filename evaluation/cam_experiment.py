"""An experiment that a Grad-CAM map can fail: on synthetic scans whose class is defined only by
localized anatomy, does a learned encoder put more of its map on that anatomy than the same
ResNet-18 at random init, both explained by the evaluation's linear protocol?

``tests/test_gradcam.py`` asserts it (seed 0); ``figs/draw_gradcam.py`` draws it over seeds and
writes ``docs/results/gradcam_synthetic.json``.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn

from evaluation import cam_shares
from evaluation import gradcam as gcam
from evaluation.data import make_transforms
from evaluation.protocols import fit_logreg
from models.encoder_io import build_resnet18
from utils.io import safe_pickle_load
from utils.synthetic_us import write_pocus_folds

#: synthetic POCUS folds whose classes differ ONLY at their findings (``local_findings``: no
#: global A-line cue), 128 px scans explained at 128 px (a 4 x 4 layer4 map; at 96 px, 3 x 3,
#: learned - random was -0.002 .. +0.038 over seeds 0-3: too coarse to be a stable test)
ANATOMY_DATA = dict(videos_per_class_per_fold=4, frames_per_video=3, size=128, local_findings=True)
ANATOMY_IMG = 128
#: optimizer steps of the supervised reference (batch 16, Adam 1e-3): train accuracy ~1
ANATOMY_STEPS = 100
ANATOMY_LIN_C = 0.1  # evaluation_aclus.py --lin_C default (selection "last")


def anatomy_data(root, seed: int) -> dict:
    """Fold 1 of the synthetic set as the evaluation reads it: ``covid_data1.pkl`` and the class
    regions of ``covid_data1_cam_masks.npz`` (row-aligned with ``X_test``), both written to
    ``root`` by the package's writers; inputs normalised as the evaluation's test transform.

    Returns:
        ``x_train`` N x 3 x S x S, ``y_train`` N, ``x_test`` M x 3 x S x S, ``y_test`` M,
        ``region`` M x S x S bool (the class anatomy in input geometry).
    """
    kw = dict(ANATOMY_DATA, seed=seed)
    write_pocus_folds(root, **kw)
    cam_shares.write_synthetic_cam_masks(root, **kw)
    X_tr, y_tr, X_te, y_te = safe_pickle_load(root / "covid_data1.pkl")
    region = np.load(root / "covid_data1_cam_masks.npz")["region"]
    tf = make_transforms(ANATOMY_IMG, False)
    as_input = lambda X: torch.stack([tf(torch.from_numpy(a)) for a in X])  # noqa: E731
    return {"x_train": as_input(X_tr), "y_train": y_tr, "x_test": as_input(X_te), "y_test": y_te,
            "region": cam_shares.to_input_geometry(region, ANATOMY_IMG)}


def random_encoder(seed: int) -> nn.Module:
    """The random-init ResNet-18 both arms start from (``fc`` = Identity, eval mode)."""
    torch.manual_seed(seed)
    enc = build_resnet18(3)
    enc.fc = nn.Identity()
    return enc.eval()


def train_reference_encoder(encoder: nn.Module, x: torch.Tensor, y: np.ndarray, seed: int,
                            steps: int = ANATOMY_STEPS, batch: int = 16, lr: float = 1e-3) -> nn.Module:
    """A copy of ``encoder`` trained supervised on (``x`` N x 3 x S x S, ``y`` N) with a 3-way
    head and horizontal flips, at the native resolution; returned without the head, in eval mode."""
    model = copy.deepcopy(encoder)
    model.fc = nn.Linear(512, 3)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    yt = torch.from_numpy(np.asarray(y))
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(yt), (batch,), generator=g)
        flip = (torch.rand(batch, generator=g) < 0.5).view(-1, 1, 1, 1)
        xb = torch.where(flip, x[idx].flip(-1), x[idx])                 # B x 3 x S x S
        loss = nn.functional.cross_entropy(model(xb), yt[idx])          # logits: B x 3
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.fc = nn.Identity()
    return model.eval()


def anatomy_shares(encoder: nn.Module, data: dict, seed: int, class_shift: int = 0) -> dict:
    """The evaluation's linear protocol on ``encoder`` (probe fitted on fold 1's training
    features, C = 0.1), Grad-CAM at ``layer4[-1]`` of every test scan's true class (or of
    class ``(y + class_shift) mod 3``), and the share of each map's energy on the scan's class anatomy.

    Returns:
        ``share`` (mean over maps with energy), ``per_class`` (3), ``accuracy`` (probe, test),
        ``shares`` (M, NaN = empty map), ``cams`` (M x S x S).
    """
    with torch.no_grad():
        f_tr, f_te = encoder(data["x_train"]).numpy(), encoder(data["x_test"]).numpy()  # N x 512, M x 512
    probe = fit_logreg(f_tr, data["y_train"], ANATOMY_LIN_C, seed)
    y = data["y_test"]
    cams, _ = gcam.compute_cams(gcam.linear_probe_classifier(encoder, probe, 3), data["x_test"], (y + class_shift) % 3)
    share = cam_shares.energy_share(cams, data["region"])
    per_class = [share[(y == c) & np.isfinite(share)] for c in range(3)]
    return {"share": float(np.nanmean(share)), "per_class": [float(v.mean()) if v.size else None for v in per_class],
            "accuracy": float((probe.predict(f_te) == y).mean()), "shares": share, "cams": cams}


def anatomy_experiment(root, seed: int) -> dict:
    """Random-init vs trained (same init) encoder, both explained by the same protocol, and the
    trained one explained for a wrong class (``learned_wrong_class``); ``uniform`` = the share
    a flat map gets (the region's area); ``data`` = :func:`anatomy_data`."""
    data = anatomy_data(root, seed)
    enc = random_encoder(seed)
    learned = train_reference_encoder(enc, data["x_train"], data["y_train"], seed)
    area = data["region"].mean(axis=(1, 2))                                              # M
    return {"random": anatomy_shares(enc, data, seed), "learned": anatomy_shares(learned, data, seed),
            "learned_wrong_class": anatomy_shares(learned, data, seed, class_shift=1),
            "uniform": {"share": float(area.mean()),
                        "per_class": [float(area[data["y_test"] == c].mean()) for c in range(3)]},
            "data": data}
