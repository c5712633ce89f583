"""Stage 6: evaluate a ResNet-18 encoder on POCUS lung ultrasound (5-fold, 3 classes) or any labelled image set.

Usage::

    python evaluation_aclus.py --data_path dataset/pocus_5fold --ckpt_path ckpt/encoder_resnet18.pth
    python evaluation_aclus.py --data_path D --protocol linear                 # random-init baseline
    python evaluation_aclus.py --data_path D --ckpt_path C --selection val --img_size 112 --epochs 30
    python evaluation_aclus.py --data_path D --ckpt_path C --protocol linear,knn,finetune_cached --img_size 112

Data (``--data_path``, alias ``--data_dir``): the USCL pickles ``covid_data1..5.pkl`` (each
``(X_train, y_train, X_test, y_test)``, NCHW uint8, labels covid19 0 / pneumonia 1 /
regular 2; read with a restricted unpickler) or the image-folder layout
``[images/]fold<k>/<class>/*.png`` (written by ``python -m utils.pocus_folds``, or your own
data set). In the folder layout the classes are the class folders, sorted, or the names
listed one per line in ``classes.txt`` beside ``fold1..5`` (any number of classes >= 2);
images are resized to ``--img_size`` on load, so their sizes may differ. Every fold file is
checked before the first fold trains.

Protocols (METHOD.md §4):

* ``finetune`` — the paper's: torchvision ResNet-18 initialised from the encoder, only
  ``layer4.1`` and a new head (one output per class) trained; Adam lr 0.01, wd 1e-4, cosine schedule,
  30 epochs, batch 32, seed 1; Resize -> RandomResizedCrop(scale 0.8-1, ratio 0.8-1.25) +
  horizontal flip; Normalize(0.5, 0.25). Unlike upstream the head IS trained.
* ``linear`` — frozen encoder, global-average-pooled 512-d features (same normalisation,
  no augmentation), standardised, scikit-learn logistic regression. Minutes on a CPU.
* ``knn`` — the same frozen features, L2-normalised; each test image takes the ``--knn_k``
  (default 20) training images of its fold with the highest cosine similarity, majority
  vote, ties to the larger summed similarity, then the lower class index. k is fixed:
  ``--selection`` chooses nothing for knn (said in the JSON's ``selection_note``).
* ``finetune_cached`` — ``finetune`` made ~5x cheaper per epoch on a CPU. Same network, initialisation,
  trainable part (``layer4.1`` + new head), loss, Adam lr/wd, cosine schedule over
  ``--epochs``, batch size, seed and ``--selection`` rules. conv1 .. ``layer4.0`` are frozen
  AND in eval mode, so their output for an image is fixed: it is computed once per image
  (shared with linear/knn, one forward pass) and ``layer4.1`` (train mode) + avgpool + head
  train on the cached 512 x S/32 x S/32 maps. What differs from the paper's protocol, and why:

  1. no augmentation (the paper: RandomResizedCrop(scale 0.8-1, ratio 0.8-1.25) + horizontal
     flip per epoch): a cached map is of the un-augmented image; augmenting would need the
     frozen layers to run on every image every epoch, which is the cost being removed;
  2. the BatchNorm statistics of the frozen layers (conv1 .. layer4.0) stay the encoder's;
     upstream calls ``model.train()``, so there they drift to POCUS batch statistics although
     the weights are frozen (``layer4.1``'s BatchNorm does adapt here, it is in train mode);
  3. the training batches are a ``torch.randperm`` per epoch from a generator seeded with
     ``--seed`` (finetune's DataLoader draws from the same generator but also takes worker
     seeds from it, so the orders differ);
  4. epochs as given by ``--epochs`` (the paper: 30).

  Why (measured on this project's 2-core CPU, 112 px, 1933 POCUS frames, under a load of
  5-10 from other jobs, so the absolute times are inflated): the full protocol cost 60 s
  per fold and epoch (``--epochs 1``: 300 s for 5 folds), i.e. ~2.5 h per encoder for 30
  epochs at 112 px and ~4x that at 224 px. Most of it is the forward pass through the
  frozen layers, recomputed for every augmented image in every epoch: one training batch
  of 32 (forward + backward) took 5.9 s for the full network and 1.1 s for layer4.1 + head
  on cached maps, under the same load (5.4x less). What remains is inherent to training
  layer4.1 (estimated ~0.19 GMAC per image and epoch at 112 px): finetune_cached still
  took ~62 s per fold and epoch at load ~9 (the full protocol would take ~5x that under
  the same load); ``--epochs`` below 30 is the other lever.
  Encoding all images once (shared with linear/knn) took 106 s at load ~9.
  Grad-CAM and ``--save_classifiers`` work: the trained ``layer4.1`` + head sit in a full
  ResNet-18 with the frozen layers (eval mode), which gives the cached pipeline's logits.

Several protocols at once: ``--protocol linear,knn,finetune_cached`` reads the checkpoint
and checks the data once, encodes each distinct image once, and writes the same files as
one run per protocol would; ``wall_time_s`` of each JSON is that protocol's own time,
``timing`` holds the setup time and the shared encoding (seconds, images, outputs kept).
``--gradcam`` with knn is an error (a kNN vote has no gradient).

Model selection (``--selection``): ``last`` (default; finetune(_cached): last epoch, linear: the
fixed ``--lin_C``; knn: nothing to select), ``val`` (epoch / C chosen on training-fold data only: a held-out split
for finetune, a 3-fold CV for linear; grouped by source video when the video is known),
``paper`` (chosen on the TEST fold as upstream does; optimistic, labelled so everywhere).

Output in ``--out_dir``: ``eval_<protocol>_<selection>.json`` (per-fold accuracy, macro-F1,
per-class precision/recall/F1, mean ± std over folds, pooled accuracy, summed confusion
matrix) and ``confusion_<protocol>_<selection>.png``. Bad input is a one-line error
(exit status 2) naming the file.

Grad-CAM (``--gradcam N``, ``--cam gradcam|gradcampp``, ``--cam_target true|pred``; see
``utils/gradcam.py``): after each fold, the fold's classifier (finetune: the selected
network; linear: the frozen encoder with the scaler + logistic regression folded into one
``nn.Linear``, the scaler's mean subtracted at ``layer4[-1]``'s output so that a map shows
evidence relative to the average training image) is explained at ``layer4[-1]`` for N
test images per class (``--cam_target``: their true class, or the predicted one):
``gradcam/<cam>_<protocol>_<selection>_<arm>_fold<k>.png`` (the maps over the images, true
and predicted class per tile; ``<arm>`` = ``random`` or the checkpoint's file stem) and the
maps with image indices, labels, predictions and shares in the ``.npy`` beside it. The JSON
gets, per fold and over all folds, the mean share per class of each map's energy inside the
ultrasound sector (derived from the image: its non-black region) and, when
``covid_data<k>_cam_masks.npz`` lies beside the pickles (arrays ``sector`` and ``region``,
N_test x H x W bool, row-aligned with ``X_test``; ``utils.gradcam.write_synthetic_cam_masks``
writes them for synthetic scans), inside the class-defining region. ``--save_classifiers``
writes each fold's classifier (weights only) to ``classifiers/`` for ``gradcam_aclus.py``.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from evaluation.data import (GROUP_RULES, NUM_FOLDS, SPLIT_NAME, ArrayDataset, DataOptions,  # noqa: F401
                             DownstreamData, Fold, carve_validation, check_images, check_labels,
                             check_uscl_tuple, discover, folder_classes, group_from_png_name, iter_folds,
                             make_transforms, open_data, write_split_csv)
from models.encoder_io import NORM_MEAN, NORM_STD, build_resnet18, load_resnet18_state
from utils import gradcam as gcam
from utils.classification_metrics import (SELECTION_NOTES, SELECTIONS, aggregate_folds, confusion_matrix,
                                          metrics_from_confusion, select_index)
from utils.distributed import seed_everything
from utils.flags import AT_LEAST_0, AT_LEAST_1, OPEN_FRACTION, POSITIVE, SEED, Range, check_flag_ranges
from utils.io import DataError, atomic_write, ensure_writable_dir
from utils.plots import plot_confusion
from utils.pocus_folds import CLASSES as POCUS_CLASSES

LINEAR_C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)


# --------------------------------------------------------------------------- #
# models
# --------------------------------------------------------------------------- #
@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device) -> np.ndarray:
    model.eval()
    return np.concatenate([model(x.to(device)).argmax(1).cpu().numpy() for x, _ in loader])


def fit_epoch(model: nn.Module, batches, loss_fn, opt, where: str) -> float:
    """One pass of ``opt`` over ``batches`` ((input, label) pairs on the device); the mean loss."""
    total, seen = 0.0, 0
    for x, y in batches:
        loss = loss_fn(model(x), y)  # logits: B x C
        if not torch.isfinite(loss):
            raise RuntimeError(f"{where}: non-finite loss {loss.item()}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total, seen = total + loss.item() * len(y), seen + len(y)
    return total / max(seen, 1)


def train_and_select(model: nn.Module, train_epoch, sched, predict_test, y_test: np.ndarray,
                     predict_val=None, y_val: np.ndarray | None = None, args=None, desc: str = "") -> dict:
    """The epoch loop and epoch selection of both fine-tune protocols.

    ``train_epoch(epoch) -> mean loss`` trains one epoch; ``sched`` is stepped after it;
    ``predict_test()`` / ``predict_val()`` -> predicted class ids of the test / validation
    images (``y_test`` / ``y_val``). ``model`` is what a selected epoch is restored into
    (its ``state_dict``). Selection per ``args.selection`` as :func:`select_index`
    (val: first best validation epoch; paper: first best test epoch, optimistic).
    """
    val_acc, test_acc, losses = [], [], []
    best_val, best_state, best_test_pred, best_test_state = -1.0, None, None, None
    keep_model = args.gradcam > 0 or args.save_classifiers  # the selected network is explained / saved
    for epoch in tqdm(range(args.epochs), desc=desc, leave=False):
        losses.append(train_epoch(epoch))
        sched.step()
        if predict_val is not None:
            acc = float((predict_val() == y_val).mean())
            val_acc.append(acc)
            if acc > best_val:  # first maximum, as select_index
                best_val, best_state = acc, copy.deepcopy(model.state_dict())
        if args.selection == "paper":
            pred = predict_test()
            test_acc.append(float((pred == y_test).mean()))
            if best_test_pred is None or test_acc[-1] > max(test_acc[:-1]):
                best_test_pred = pred
                if keep_model:
                    best_test_state = copy.deepcopy(model.state_dict())

    chosen = select_index(args.selection, args.epochs, val_acc or None, test_acc or None)
    if args.selection == "paper":
        pred = best_test_pred
        if keep_model:
            model.load_state_dict(best_test_state)
    else:
        if args.selection == "val":
            model.load_state_dict(best_state)
        pred = predict_test()
    return {"pred": pred, "selected": {"epoch": chosen + 1}, "train_loss": losses,
            "val_accuracy": val_acc or None, "test_accuracy_per_epoch": test_acc or None,
            "model": model.eval() if keep_model else None}


def _trainable_layer4_1_and_head(model: nn.Module) -> list[nn.Parameter]:
    """Freeze everything but ``layer4.1`` and ``fc`` (the paper's fine-tune); returns those."""
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith(("layer4.1.", "fc.")))
    return [p for p in model.parameters() if p.requires_grad]


def run_finetune_fold(fold: Fold, state: dict | None, args, device: torch.device) -> dict:
    """Paper protocol on one fold; returns test predictions of the selected epoch and the curve."""
    seed_everything(args.seed)  # same seed per fold: a fold's result does not depend on the others
    model = build_resnet18(len(fold.classes), state).to(device)
    # only the last residual block and the new head learn (the upstream code froze the head too)
    opt = torch.optim.Adam(_trainable_layer4_1_and_head(model), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)

    tr_idx, va_idx = np.arange(len(fold.y_train)), None
    if args.selection == "val":
        tr_idx, va_idx = carve_validation(fold.y_train, fold.groups_train, args.val_fraction, args.seed)
    g = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(ArrayDataset(fold.X_train[tr_idx], fold.y_train[tr_idx], make_transforms(args.img_size, True)),
                              batch_size=args.batch_size, shuffle=True, generator=g, num_workers=args.workers,
                              drop_last=len(tr_idx) > args.batch_size)  # no 1-sample batch for BatchNorm
    test_tf = make_transforms(args.img_size, False)
    test_loader = DataLoader(ArrayDataset(fold.X_test, fold.y_test, test_tf), batch_size=2 * args.batch_size,
                             num_workers=args.workers)
    val_loader = None if va_idx is None else DataLoader(
        ArrayDataset(fold.X_train[va_idx], fold.y_train[va_idx], test_tf), batch_size=2 * args.batch_size,
        num_workers=args.workers)
    loss_fn = nn.CrossEntropyLoss()

    def train_epoch(epoch: int) -> float:
        # train() as upstream: BatchNorm statistics of the frozen layers adapt to POCUS too
        model.train()
        return fit_epoch(model, ((x.to(device), y.to(device)) for x, y in train_loader), loss_fn, opt,
                         f"fold {fold.index} epoch {epoch}")

    return train_and_select(
        model, train_epoch, sched, lambda: predict(model, test_loader, device), fold.y_test,
        None if val_loader is None else (lambda: predict(model, val_loader, device)),
        None if va_idx is None else fold.y_train[va_idx], args, f"fold {fold.index} finetune")


class FeatureCache:
    """Frozen-encoder outputs keyed by image content: the 5 USCL pickles hold the same images,
    so each image is encoded once instead of five times, and one forward pass serves every
    frozen-feature protocol of a run (outputs are deterministic: eval mode, no augmentation).

    Per image: the global-average-pooled C5 feature (512-d; linear, knn) and, with
    ``keep_maps``, the output map of ``layer4[0]`` (512 x S/32 x S/32; finetune_cached).
    ``encoded`` counts the images that went through the encoder, ``seconds`` their time.
    """

    def __init__(self, state: dict | None, args, device: torch.device, keep_maps: bool = False):
        seed_everything(args.seed)  # random-init baseline: the same encoder for every fold
        model = build_resnet18(len(POCUS_CLASSES), state)  # the head is dropped: any size
        model.fc = nn.Identity()  # -> global-average-pooled 512-d features
        self.model = model.to(device).eval()
        # conv1 .. layer4[0]: the part of the network finetune_cached keeps frozen
        self.trunk = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool,
                                   model.layer1, model.layer2, model.layer3, model.layer4[0])
        self.args, self.device, self.keep_maps = args, device, keep_maps
        self.cache: dict[bytes, np.ndarray] = {}  # key -> 512 float32
        self.map_cache: dict[bytes, np.ndarray] = {}  # key -> 512 x h x w float32
        self.encoded, self.seconds = 0, 0.0

    @staticmethod
    def keys(X: np.ndarray) -> list[bytes]:
        return [hashlib.blake2b(x.tobytes(), digest_size=16).digest() for x in X]

    @torch.no_grad()
    def add(self, X: np.ndarray, desc: str = "features") -> list[bytes]:
        """Encode the images of ``X`` (N x 3 x H x W uint8) not cached yet; returns their keys."""
        keys = self.keys(X)
        todo, fresh = [], set()  # first occurrence of each uncached image
        for i, k in enumerate(keys):
            if k not in self.cache and k not in fresh:
                fresh.add(k)
                todo.append(i)
        if todo:
            t0 = time.time()
            loader = DataLoader(ArrayDataset(X[todo], np.zeros(len(todo), dtype=np.int64),
                                             make_transforms(self.args.img_size, False)),
                                batch_size=2 * self.args.batch_size, num_workers=self.args.workers)
            feats, maps = [], []
            for x, _ in tqdm(loader, desc=desc, leave=False):
                m = self.trunk(x.to(self.device))  # B x 512 x h x w
                f = torch.flatten(self.model.avgpool(self.model.layer4[1](m)), 1)  # B x 512, = model(x)
                feats.append(f.cpu().numpy())
                if self.keep_maps:
                    maps.append(m.cpu().numpy())
            for i, f in zip(todo, np.concatenate(feats)):
                self.cache[keys[i]] = f
            if self.keep_maps:
                for i, m in zip(todo, np.concatenate(maps)):
                    self.map_cache[keys[i]] = m
            self.encoded += len(todo)
            self.seconds += time.time() - t0
        return keys

    def __call__(self, X: np.ndarray, desc: str = "features") -> np.ndarray:
        """``X``: N x 3 x H x W uint8 -> N x 512 float32."""
        return np.stack([self.cache[k] for k in self.add(X, desc)]).astype(np.float32)

    def maps(self, X: np.ndarray, desc: str = "features") -> np.ndarray:
        """``X``: N x 3 x H x W uint8 -> N x 512 x h x w float32 ``layer4[0]`` outputs."""
        if not self.keep_maps:
            raise ValueError("FeatureCache built without keep_maps")
        return np.stack([self.map_cache[k] for k in self.add(X, desc)]).astype(np.float32)


def knn_predict(F_train: np.ndarray, y_train: np.ndarray, F_test: np.ndarray, k: int,
                num_classes: int) -> np.ndarray:
    """Cosine kNN vote. ``F_train``: N x D, ``y_train``: N, ``F_test``: M x D -> M class ids.

    Features are L2-normalised; each test image takes the ``k`` training images of highest
    cosine similarity (equal similarities: the lower training index first; similarities
    are rounded to 10 decimals so that equal vectors tie whatever the BLAS summation
    order), each votes for its class; the most votes win, a tie goes to the class with the
    larger summed similarity of its voters, then to the lower class index.
    """
    def unit(F):
        F = np.asarray(F, dtype=np.float64)
        return F / np.maximum(np.linalg.norm(F, axis=1, keepdims=True), 1e-12)

    y_train = np.asarray(y_train, dtype=np.int64)
    k = min(int(k), len(y_train))
    sim = np.round(unit(F_test) @ unit(F_train).T, 10)  # M x N cosine similarities
    nn_idx = np.argsort(-sim, axis=1, kind="stable")[:, :k]  # M x k, most similar first
    rows = np.repeat(np.arange(len(sim)), k)
    votes = np.zeros((len(sim), num_classes))  # M x C
    sim_sum = np.zeros((len(sim), num_classes))  # M x C
    np.add.at(votes, (rows, y_train[nn_idx].ravel()), 1.0)
    np.add.at(sim_sum, (rows, y_train[nn_idx].ravel()), np.take_along_axis(sim, nn_idx, 1).ravel())
    tied = votes == votes.max(1, keepdims=True)
    return np.where(tied, sim_sum, -np.inf).argmax(1)  # argmax: first maximum = lower class index


def run_knn_fold(fold: Fold, features: FeatureCache, args) -> dict:
    """kNN probe (cosine, k = ``args.knn_k``) on frozen features; nothing is selected."""
    pred = knn_predict(features(fold.X_train, f"fold {fold.index} features"), fold.y_train,
                       features(fold.X_test, f"fold {fold.index} features"), args.knn_k, len(fold.classes))
    return {"pred": pred, "selected": {"k": min(args.knn_k, len(fold.y_train))}}


def run_finetune_cached_fold(fold: Fold, features: FeatureCache, args, device: torch.device) -> dict:
    """The paper's fine-tune on cached ``layer4[0]`` outputs (see the module docstring).

    conv1 .. layer4.0 are frozen and in eval mode, so their output for an un-augmented image
    is fixed and read from ``features``; ``layer4.1`` (train mode) + avgpool + a new ``fc``
    learn on it with the paper's optimiser and schedule. The returned ``model`` (kept for
    Grad-CAM / --save_classifiers) is the full ResNet-18 holding the trained blocks.
    """
    seed_everything(args.seed)  # same fc init as run_finetune_fold
    model = build_resnet18(len(fold.classes))
    # the frozen part is the very encoder whose maps are cached (random init included)
    missing, unexpected = model.load_state_dict(features.model.state_dict(), strict=False)
    assert not unexpected and set(missing) == {"fc.weight", "fc.bias"}, (missing, unexpected)
    model = model.to(device).eval()  # frozen layers stay in eval mode throughout
    opt = torch.optim.Adam(_trainable_layer4_1_and_head(model), lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    head = nn.Sequential(model.layer4[1], model.avgpool, nn.Flatten(1), model.fc)  # shares the modules

    tr_idx, va_idx = np.arange(len(fold.y_train)), None
    if args.selection == "val":
        tr_idx, va_idx = carve_validation(fold.y_train, fold.groups_train, args.val_fraction, args.seed)
    maps_train = torch.from_numpy(features.maps(fold.X_train, f"fold {fold.index} features"))  # N x 512 x h x w
    maps_test = torch.from_numpy(features.maps(fold.X_test, f"fold {fold.index} features"))
    y_tr = torch.from_numpy(fold.y_train[tr_idx])
    g = torch.Generator().manual_seed(args.seed)
    loss_fn = nn.CrossEntropyLoss()

    @torch.no_grad()
    def predict_maps(maps: torch.Tensor) -> np.ndarray:
        head.eval()
        return np.concatenate([head(m.to(device)).argmax(1).cpu().numpy()
                               for m in maps.split(2 * args.batch_size)])

    def train_epoch(epoch: int) -> float:
        head.train()  # layer4.1's BatchNorm learns POCUS statistics; the frozen part never runs
        batches = torch.randperm(len(tr_idx), generator=g).split(args.batch_size)
        if len(tr_idx) > args.batch_size and len(batches[-1]) < args.batch_size:
            batches = batches[:-1]  # drop_last, as run_finetune_fold: no 1-sample batch for BatchNorm
        return fit_epoch(head, ((maps_train[tr_idx[b.numpy()]].to(device), y_tr[b].to(device)) for b in batches),
                         loss_fn, opt, f"fold {fold.index} epoch {epoch}")

    out = train_and_select(
        model, train_epoch, sched, lambda: predict_maps(maps_test), fold.y_test,
        None if va_idx is None else (lambda: predict_maps(maps_train[va_idx])),
        None if va_idx is None else fold.y_train[va_idx], args, f"fold {fold.index} finetune_cached")
    model.eval()
    return out


def _fit_logreg(F: np.ndarray, y: np.ndarray, C: float, seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000, random_state=seed))
    return clf.fit(F, y)


def run_linear_fold(fold: Fold, features: FeatureCache, args) -> dict:
    """Logistic regression on frozen features; C fixed (last), by grouped CV (val) or by test (paper)."""
    from sklearn.model_selection import StratifiedGroupKFold

    Ftr = features(fold.X_train, f"fold {fold.index} features")
    Fte = features(fold.X_test, f"fold {fold.index} features")
    grid = list(LINEAR_C_GRID)
    val_acc, test_acc = None, None
    if args.selection == "last":
        grid = [args.lin_C]
    elif args.selection == "val":  # 3-fold CV on the training folds only
        groups = fold.groups_train if fold.groups_train is not None else np.arange(len(fold.y_train))
        splits = list(StratifiedGroupKFold(3, shuffle=True, random_state=args.seed)
                      .split(Ftr, fold.y_train, groups))
        val_acc = [float(np.mean([(_fit_logreg(Ftr[a], fold.y_train[a], C, args.seed).predict(Ftr[b])
                                   == fold.y_train[b]).mean() for a, b in splits])) for C in grid]
    else:  # paper: optimistic, C picked on the test fold
        test_acc = [float((_fit_logreg(Ftr, fold.y_train, C, args.seed).predict(Fte) == fold.y_test).mean())
                    for C in grid]
    chosen = select_index(args.selection, len(grid), val_acc, test_acc)
    probe = _fit_logreg(Ftr, fold.y_train, grid[chosen], args.seed)
    return {"pred": probe.predict(Fte), "selected": {"C": grid[chosen]}, "C_grid": grid if len(grid) > 1 else None,
            "val_accuracy": val_acc, "test_accuracy_per_C": test_acc, "probe": probe}


# --------------------------------------------------------------------------- #
# Grad-CAM (utils/gradcam.py holds the pure parts)
# --------------------------------------------------------------------------- #
CAM_MASKS_NAME = "covid_data{k}_cam_masks.npz"


def arm_name(ckpt_path: str | None) -> str:
    """``random`` or the checkpoint's file stem, safe as part of a file name."""
    if not ckpt_path:
        return "random"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(ckpt_path).stem) or "checkpoint"


def check_gradcam_args(args) -> None:
    """The Grad-CAM flags, before any work: N >= 0 and an input size whose layer4 map is a map."""
    if args.gradcam < 0:
        raise DataError(f"--gradcam {args.gradcam}: must be >= 0 (test images per class to explain; 0 = off)")
    if args.gradcam:
        gcam.cam_grid(build_resnet18(2), args.img_size)


def load_cam_masks(path: Path, n: int | None = None, hw: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """``sector`` and ``region`` (N x H x W bool) of a ``covid_data<k>_cam_masks.npz``, checked
    (against the fold's ``n`` test images of size ``hw`` when given); read without pickle."""
    try:
        with np.load(path, allow_pickle=False) as z:
            masks = {k: z[k] for k in ("sector", "region") if k in z.files}
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path}: unreadable mask file ({type(e).__name__}: {e})") from None
    if set(masks) != {"sector", "region"}:
        raise DataError(f"{path}: needs arrays 'sector' and 'region' (N x H x W bool)")
    shapes = {k: v.shape for k, v in masks.items()}
    if any(len(sh) != 3 for sh in shapes.values()) or shapes["sector"] != shapes["region"]:
        raise DataError(f"{path}: 'sector' and 'region' must be N x H x W arrays of one shape, found {shapes}")
    if n is not None and shapes["sector"] != (n, *hw):
        raise DataError(f"{path}: masks of shape {shapes['sector']}, but the fold has {n} test images of "
                        f"{hw[0]}x{hw[1]}")
    return {k: v.astype(bool) for k, v in masks.items()}


def fold_cam_masks(fold: Fold) -> dict[str, np.ndarray] | None:
    """The fold's sector/region masks from the file beside its pickle, or None (then the
    sector is derived from each image and the region is unknown)."""
    path = Path(fold.source).parent / CAM_MASKS_NAME.format(k=fold.index)
    if not fold.source.endswith(".pkl") or not path.is_file():
        return None
    return load_cam_masks(path, len(fold.y_test), fold.X_test.shape[2:])


def explain_fold(fold: Fold, model: nn.Module, args, device: torch.device, png: Path) -> tuple[dict, np.ndarray]:
    """Grad-CAM of ``args.gradcam`` test images per class of ``fold``; writes the montage
    ``png`` and its ``.npy``. Returns the fold's JSON entry and the records."""
    classes = fold.classes
    idx = gcam.pick_per_class(fold.y_test, args.gradcam, len(classes))
    tf = make_transforms(args.img_size, False)
    x = torch.stack([tf(torch.from_numpy(fold.X_test[i])) for i in idx]).to(device)  # n x 3 x S x S
    model = model.to(device).eval()
    with torch.no_grad():
        pred = np.concatenate([model(xb).argmax(1).cpu().numpy() for xb in x.split(2 * args.batch_size)])
    target = fold.y_test[idx] if args.cam_target == "true" else pred
    cams, _ = gcam.compute_cams(model, x, target, args.cam, 2 * args.batch_size)
    images = gcam.display_images(x, NORM_MEAN, NORM_STD)
    masks = fold_cam_masks(fold)
    if masks is None:
        sector, region = np.stack([gcam.sector_mask(im) for im in images]), None
    else:
        sector = gcam.to_input_geometry(masks["sector"][idx], args.img_size)
        region = gcam.to_input_geometry(masks["region"][idx], args.img_size)
    rec = gcam.cam_records(idx, fold.y_test[idx], pred, target, cams, classes, gcam.energy_share(cams, sector),
                           None if region is None else gcam.energy_share(cams, region),
                           None if region is None else region.mean(axis=(1, 2)))
    title = (f"{args.cam} ({args.cam_target} class), {args.protocol}/{args.selection}, "
             f"{arm_name(args.ckpt_path)}, fold {fold.index}")
    gcam.write_cam_outputs(rec, images, png, title, cols=max(1, min(args.gradcam, len(idx))))
    entry = {"montage": str(png), "maps": str(png.with_suffix(".npy")), "sector_from": (
        "image" if masks is None else "masks file"), **cam_summary(rec, classes)}
    return entry, rec


def cam_summary(rec: np.ndarray, classes: tuple[str, ...]) -> dict:
    """Mean shares per class (maps without energy left out and counted) of some records."""
    known = bool(np.isfinite(rec["region_share"]).any())
    out = {"images": {c: int((rec["label"] == i).sum()) for i, c in enumerate(classes)},
           "empty_maps": {c: int(((rec["label"] == i) & ~np.isfinite(rec["sector_share"])).sum())
                          for i, c in enumerate(classes)}}
    for key in ("sector_share", "region_share", "region_area"):
        if key != "sector_share" and not known:
            out[key] = None
            continue
        v = rec[key]
        out[key] = {**gcam.class_means(v, rec["label"], classes),
                    "all": float(np.nanmean(v)) if np.isfinite(v).any() else None}
    return out


# --------------------------------------------------------------------------- #
# reporting
# --------------------------------------------------------------------------- #
PROTOCOLS = ("finetune", "linear", "knn", "finetune_cached")
FINETUNE_CACHED_NOTE = ("the paper's finetune (layer4.1 + new head trained, Adam, cosine schedule, batch, seed) "
                        "on cached layer4.0 outputs: conv1..layer4.0 frozen in eval mode (their BatchNorm "
                        "statistics are the encoder's, not adapted to POCUS as upstream's model.train()), no "
                        "RandomResizedCrop/flip augmentation, epochs = config.epochs; see evaluation_aclus.py")
#: protocols that read frozen-encoder outputs from the shared FeatureCache
FROZEN_PROTOCOLS = ("linear", "knn", "finetune_cached")
KNN_SELECTION_NOTE = ("none: k = {k} is fixed (--knn_k), so --selection chooses nothing for knn "
                      "(last, val and paper give the same result)")


def parse_protocols(text: str) -> tuple[str, ...]:
    """``--protocol`` (one name or a comma list) -> the protocols in the order given."""
    names = [t.strip() for t in str(text).split(",")]
    if not any(names) or "" in names:
        raise DataError(f"--protocol {text!r}: empty entry; give one or more of {', '.join(PROTOCOLS)}, "
                        "comma-separated (e.g. linear,knn,finetune_cached)")
    for n in names:
        if n not in PROTOCOLS:
            raise DataError(f"--protocol {text!r}: unknown protocol {n!r}; choose from {', '.join(PROTOCOLS)}")
    if len(set(names)) != len(names):
        raise DataError(f"--protocol {text!r}: a protocol is listed twice")
    return tuple(names)


def check_protocol_args(args) -> tuple[str, ...]:
    """The protocol flags, before any work; returns the protocols."""
    protocols = parse_protocols(args.protocol)
    if args.gradcam and "knn" in protocols:
        raise DataError("--gradcam with --protocol knn: a kNN vote has no gradient to explain; "
                        "drop knn from --protocol or run it without --gradcam")
    check_flag_ranges(args, FLAG_RANGES)
    return protocols


#: checked before any work (utils/flags.py)
FLAG_RANGES = {
    "--knn_k": AT_LEAST_1, "--epochs": AT_LEAST_1, "--img_size": AT_LEAST_1, "--batch_size": AT_LEAST_1,
    "--workers": AT_LEAST_0, "--gradcam": AT_LEAST_0, "--seed": SEED,
    "--lr": POSITIVE, "--lin_C": POSITIVE, "--weight_decay": AT_LEAST_0, "--val_fraction": OPEN_FRACTION,
    "--folds": Range(2), "--split_seed": SEED, "--pad_value": Range(0, 255),
}


def evaluate(args) -> dict:
    """Run every protocol of ``args.protocol`` on the 5 folds; returns the result of a single
    protocol, or ``{protocol: result}`` for a comma list. The checkpoint is read and the data
    checked once; each image is encoded once for all frozen-feature protocols."""
    t0 = time.time()
    protocols = check_protocol_args(args)
    device = torch.device(args.device)
    check_gradcam_args(args)
    ensure_writable_dir(args.out_dir, "--out_dir")  # not after five folds of work
    for wanted, sub in ((args.gradcam, "gradcam"), (args.save_classifiers, "classifiers")):
        if wanted:
            ensure_writable_dir(Path(args.out_dir) / sub, f"--out_dir's {sub}/")
    # read the weights first: a wrong checkpoint fails before any data is loaded
    state = load_resnet18_state(args.ckpt_path) if args.ckpt_path else None
    data = open_data(args.data_path, data_options(args), args.out_dir)  # every fold checked before any work
    for note in data.notes:
        print(f"note: {note}")
    if data.rows is not None:  # the split goes beside the results, so that a re-run uses the same one
        split_path = Path(args.out_dir) / SPLIT_NAME
        atomic_write(split_path, lambda f: f.write(write_split_csv(data.rows)))
        data.split_path = split_path if data.split_path is None else data.split_path
    if args.gradcam:
        for k in range(1, data.num_folds + 1):  # a bad mask file fails now, not after fold k-1
            path = data.root / CAM_MASKS_NAME.format(k=k)
            if path.is_file():
                load_cam_masks(path)
    frozen = [p for p in protocols if p in FROZEN_PROTOCOLS]
    features = None
    if frozen:  # one forward pass per distinct image, shared by all frozen-feature protocols
        features = FeatureCache(state, args, device, keep_maps="finetune_cached" in frozen)
        for fold in data.iter_folds(args.img_size):
            features.add(fold.X_train, f"encode fold {fold.index}")
            features.add(fold.X_test, f"encode fold {fold.index}")
        print(f"encoded {features.encoded} images once for {', '.join(frozen)} ({features.seconds:.1f} s)")
    timing = {"setup_s": round(time.time() - t0, 2),
              "shared_features": None if features is None else {
                  "seconds": round(features.seconds, 2), "images_encoded": features.encoded,
                  "outputs": ["avgpool_512"] + (["layer4.0_maps"] if features.keep_maps else []),
                  "shared_by": frozen}}
    results = {}
    for protocol in protocols:
        pargs = argparse.Namespace(**{**vars(args), "protocol": protocol})
        results[protocol] = run_protocol(pargs, state, data, features, device, timing, protocols)
    if len(protocols) > 1:
        print(f"all protocols: {time.time() - t0:.1f} s")
    return results[protocols[0]] if len(protocols) == 1 else results


def run_protocol(args, state: dict | None, data: DownstreamData, features: FeatureCache | None,
                 device: torch.device, timing: dict, protocols: tuple[str, ...]) -> dict:
    """One protocol (``args.protocol``) on the folds: ``eval_<protocol>_<selection>.json`` + PNG.
    ``wall_time_s`` is this protocol's own time; the shared encoding is in ``timing``."""
    t0 = time.time()
    classes = data.classes
    protocol = args.protocol
    tag, arm = f"{protocol}_{args.selection}", arm_name(args.ckpt_path)
    explainable = protocol != "knn"  # a kNN vote is no nn.Module
    if args.save_classifiers and not explainable:
        print("note: --save_classifiers: knn has no network classifier; none saved for it", file=sys.stderr)

    folds, confusions, cam_records = [], [], []
    for fold in tqdm(data.iter_folds(args.img_size), total=data.num_folds, desc=f"{protocol} {data.num_folds}-fold"):
        if fold.groups_train is None and args.selection == "val" and protocol != "knn":
            print(f"note: {fold.source}: source videos unknown, validation split is by frame "
                  "(frames of one video may sit in train and val)", file=sys.stderr)
        if protocol == "linear":
            out = run_linear_fold(fold, features, args)
        elif protocol == "knn":
            out = run_knn_fold(fold, features, args)
        elif protocol == "finetune_cached":
            out = run_finetune_cached_fold(fold, features, args, device)
        else:
            out = run_finetune_fold(fold, state, args, device)
        cm = confusion_matrix(fold.y_test, out.pop("pred"), len(classes))
        confusions.append(cm)
        m = metrics_from_confusion(cm, classes)
        model, probe = out.pop("model", None), out.pop("probe", None)
        if (args.gradcam or args.save_classifiers) and explainable:
            if model is None:  # linear: encoder + scaler + logistic regression as one module
                model = gcam.linear_probe_classifier(features.model, probe, len(classes))
            if args.save_classifiers:
                out["classifier"] = str(gcam.save_classifier(
                    model, Path(args.out_dir) / "classifiers" / f"{tag}_{arm}_fold{fold.index}.pth", classes,
                    protocol=protocol, selection=args.selection, arm=arm, fold=fold.index,
                    img_size=args.img_size, resize=args.resize, pad_value=args.pad_value,
                    norm_mean=list(NORM_MEAN), norm_std=list(NORM_STD),
                    data_path=str(args.data_path), ckpt_path=args.ckpt_path or None))
            if args.gradcam:
                png = Path(args.out_dir) / "gradcam" / f"{args.cam}_{tag}_{arm}_fold{fold.index}.png"
                out["gradcam"], rec = explain_fold(fold, model, args, device, png)
                cam_records.append(rec)
        del model
        folds.append({"fold": fold.index, "source": fold.source, "n_train": int(len(fold.y_train)),
                      "n_test": int(len(fold.y_test)), **m, "confusion_matrix": cm.tolist(), **out})
        tqdm.write(f"fold {fold.index}: accuracy {m['accuracy']:.4f}  macro-F1 {m['macro_f1']:.4f}  "
                   f"selected {out['selected']}")
    if len(folds) != data.num_folds:
        raise DataError(f"{args.data_path}: found {len(folds)} folds, expected {data.num_folds}")

    optimistic = args.selection == "paper" and protocol != "knn"  # knn selects nothing
    summary = aggregate_folds(confusions, classes)
    result = {
        "protocol": protocol, "selection": args.selection, "optimistic": optimistic,
        "selection_note": (KNN_SELECTION_NOTE.format(k=args.knn_k) if protocol == "knn"
                           else SELECTION_NOTES[args.selection]),
        "ckpt_path": args.ckpt_path or None, "init": "checkpoint" if args.ckpt_path else "random",
        "data_path": str(args.data_path), "classes": list(classes), "data": data.info(),
        "config": {k: v for k, v in vars(args).items() if k not in ("data_path", "ckpt_path", "out_dir")},
        "protocols_in_run": list(protocols),
        "summary": summary, "folds": folds,
    }
    if protocol == "finetune_cached":
        result["protocol_note"] = FINETUNE_CACHED_NOTE
    if args.gradcam:  # over the maps of all folds
        result["gradcam"] = {"method": args.cam, "target": args.cam_target, "layer": "layer4[-1]",
                             "images_per_class": args.gradcam, "arm": arm,
                             **cam_summary(np.concatenate(cam_records), classes)}
    out_dir = Path(args.out_dir)
    json_path, png_path = out_dir / f"eval_{tag}.json", out_dir / f"confusion_{tag}.png"
    result["confusion_png"] = str(png_path)
    title = (f"{protocol}, selection={args.selection}, init={result['init']}\n"
             f"pooled acc {summary['pooled_accuracy']:.4f} ({summary['pooled_correct']}/{summary['pooled_total']})")
    if optimistic:
        title = "OPTIMISTIC (paper protocol: epoch chosen on test fold)\n" + title
    plot_confusion(np.array(summary["confusion_matrix_sum"]), classes, png_path, title)
    # this protocol's own time (folds + report); the shared encoding and the setup are in "timing"
    result["wall_time_s"] = round(time.time() - t0, 2)
    result["timing"] = timing
    atomic_write(json_path, lambda f: f.write(json.dumps(result, indent=2).encode()))

    label = " [OPTIMISTIC: paper protocol, selected on the test fold]" if optimistic else ""
    print(f"{protocol} / selection={args.selection}{label}")
    print(f"accuracy {summary['accuracy_mean']:.4f} ± {summary['accuracy_std']:.4f}  "
          f"macro-F1 {summary['macro_f1_mean']:.4f} ± {summary['macro_f1_std']:.4f}  "
          f"pooled accuracy {summary['pooled_accuracy']:.4f} ({summary['pooled_correct']}/{summary['pooled_total']})")
    for c, v in summary["pooled_per_class"].items():
        print(f"  {c:10s} precision {v['precision']:.4f}  recall {v['recall']:.4f}  f1 {v['f1']:.4f}  n={v['support']}")
    if args.gradcam:
        g = result["gradcam"]
        shares = f"sector {g['sector_share']['all']:.3f}" if g["sector_share"]["all"] is not None else "no energy"
        if g["region_share"]:
            shares += f", class region {g['region_share']['all']:.3f} (area {g['region_area']['all']:.3f})"
        print(f"Grad-CAM energy share ({args.cam}, {args.cam_target} class): {shares}; maps in {out_dir / 'gradcam'}")
    print(f"wrote {json_path} and {png_path} ({result['wall_time_s']:.1f} s)")
    return result


def data_options(args) -> DataOptions:
    return DataOptions(folds=args.folds, resize=args.resize, pad_value=args.pad_value, groups=args.groups,
                       group_rule=args.group_rule, split_seed=args.split_seed, split=args.split)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Evaluate a ResNet-18 encoder on POCUS (5-fold, covid19/"
                                "pneumonia/regular) or any labelled image set: pre-split folds or a plain "
                                "<class>/ image folder (folds made here).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data_path", "--data_dir", dest="data_path", required=True,
                   help="folder with covid_data1..K.pkl (USCL format), [images/]fold1..K/<class>/* (python -m "
                        "utils.pocus_folds writes both), or a plain ImageFolder <class>/**/* whose folds are made "
                        "here; classes = the class folders, sorted, or classes.txt")
    d = p.add_argument_group("data: folds, groups, image fitting")
    d.add_argument("--folds", type=int, default=NUM_FOLDS, help="K: the number of folds")
    d.add_argument("--groups", default=None,
                   help="ImageFolder: CSV with columns file,group (file relative to --data_path, or a unique bare "
                        "name), so that one patient never sits on both sides of a fold")
    d.add_argument("--group_rule", default=None,
                   help=f"ImageFolder, without --groups: {' or '.join(GROUP_RULES)} (folder = the first folder "
                        "below the class; frame = the <video>__f<frame> names of utils.pocus_folds) or a regular "
                        "expression whose first group, searched in the file name, is the group")
    d.add_argument("--split_seed", type=int, default=0,
                   help="ImageFolder: seed of the fold assignment (not --seed: every seed shares the folds)")
    d.add_argument("--split", default=None,
                   help=f"ImageFolder: a {SPLIT_NAME} to use (default: OUT_DIR/{SPLIT_NAME} if a run there made "
                        "one, else a new split written there)")
    d.add_argument("--resize", choices=("letterbox", "squash"), default="letterbox",
                   help="fitting images of another shape to the square input: letterbox keeps the aspect ratio "
                        "(centred on --pad_value); squash stretches (the aspect ratio lost)")
    d.add_argument("--pad_value", type=int, default=0, help="grey level of the letterbox padding (0..255)")
    p.add_argument("--ckpt_path", default=None,
                   help="pretrain_aclus.py checkpoint, exported encoder, or torchvision resnet18 state dict; "
                        "omit for the random-init baseline")
    p.add_argument("--protocol", default="finetune", metavar="P[,P...]",
                   help="one or a comma list of: finetune = paper protocol (layer4.1 + head, augmented); "
                        "linear = frozen features + logistic regression; knn = frozen features, cosine "
                        "k-NN vote; finetune_cached = finetune on cached layer4.0 outputs (no augmentation, "
                        "frozen BatchNorm statistics; affordable on a CPU). E.g. linear,knn,finetune_cached: "
                        "each image encoded once, one JSON per protocol")
    p.add_argument("--selection", choices=SELECTIONS, default="last",
                   help="last: honest, fixed; val: chosen on training-fold data; "
                        "paper: chosen on the test fold (OPTIMISTIC, as upstream)")
    p.add_argument("--out_dir", default="eval_out", help="where the JSON and confusion-matrix PNG go")
    p.add_argument("--img_size", type=int, default=224, help="input side (paper: 224; 112 is ~4x cheaper)")
    p.add_argument("--epochs", type=int, default=30, help="finetune / finetune_cached epochs (paper: 30)")
    p.add_argument("--knn_k", type=int, default=20, help="neighbours of the knn protocol (cosine similarity)")
    p.add_argument("--batch_size", type=int, default=32, help="batch size (paper: 32)")
    p.add_argument("--lr", type=float, default=0.01, help="Adam learning rate (paper: 0.01)")
    p.add_argument("--weight_decay", type=float, default=1e-4, help="Adam weight decay (paper: 1e-4)")
    p.add_argument("--val_fraction", type=float, default=0.2,
                   help="share of the training folds held out for --selection val (finetune)")
    p.add_argument("--lin_C", type=float, default=0.1,
                   help=f"inverse L2 strength of the linear probe for --selection last "
                        f"(val/paper search {list(LINEAR_C_GRID)})")
    p.add_argument("--seed", type=int, default=1, help="seed (paper: 1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--gradcam", type=int, default=0, metavar="N",
                   help="after each fold, Grad-CAM at layer4[-1] of N test images per class: montage PNG + maps "
                        ".npy under OUT_DIR/gradcam/, energy shares in the JSON (0 = off; needs --img_size >= 33)")
    p.add_argument("--cam", choices=tuple(gcam.CAM_METHODS), default="gradcam",
                   help="map method of pytorch_grad_cam: gradcam (Grad-CAM) or gradcampp (Grad-CAM++)")
    p.add_argument("--cam_target", choices=gcam.CAM_TARGETS, default="true",
                   help="class each map explains: the image's true class or the predicted one")
    p.add_argument("--save_classifiers", action="store_true",
                   help="save each fold's classifier (ResNet-18 state dict + class names, weights only) to "
                        "OUT_DIR/classifiers/ for gradcam_aclus.py")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    try:
        evaluate(args)
    except DataError as e:  # bad input: one line naming the file, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
