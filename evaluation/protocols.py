"""The downstream protocols of ``evaluation_aclus.py``: how one fold is trained and
predicted, and a registry that says what each needs and gives (:data:`PROTOCOLS`).

The protocols (METHOD.md §4):

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

A new protocol is one ``run_*_fold`` function and one :class:`Protocol` entry; the runner
(:mod:`evaluation.runner`) reads only the entry.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from evaluation.data import ArrayDataset, Fold, carve_validation, make_transforms
from evaluation.features import FeatureCache
from models.encoder_io import build_resnet18
from evaluation.metrics import select_index
from utils.distributed import seed_everything
from utils.io import DataError

LINEAR_C_GRID = (0.001, 0.01, 0.1, 1.0, 10.0)


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


def fit_logreg(F: np.ndarray, y: np.ndarray, C: float, seed: int):
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
        val_acc = [float(np.mean([(fit_logreg(Ftr[a], fold.y_train[a], C, args.seed).predict(Ftr[b])
                                   == fold.y_train[b]).mean() for a, b in splits])) for C in grid]
    else:  # paper: optimistic, C picked on the test fold
        test_acc = [float((fit_logreg(Ftr, fold.y_train, C, args.seed).predict(Fte) == fold.y_test).mean())
                    for C in grid]
    chosen = select_index(args.selection, len(grid), val_acc, test_acc)
    probe = fit_logreg(Ftr, fold.y_train, grid[chosen], args.seed)
    return {"pred": probe.predict(Fte), "selected": {"C": grid[chosen]}, "C_grid": grid if len(grid) > 1 else None,
            "val_accuracy": val_acc, "test_accuracy_per_C": test_acc, "probe": probe}


# --------------------------------------------------------------------------- #
# the registry
# --------------------------------------------------------------------------- #
class FoldInputs(NamedTuple):
    """What a protocol's fold function may read besides the fold."""
    state: dict | None            # the encoder's state dict (None: random init)
    features: FeatureCache | None  # the shared frozen-encoder outputs (frozen protocols)
    args: object                   # the evaluation's flags
    device: torch.device


@dataclass(frozen=True)
class Protocol:
    """One downstream protocol: its fold function and what it needs and gives.

    ``run_fold(fold, inputs) -> {"pred": test class ids, "selected": ..., ...}``; a network
    it trained goes in ``"model"`` (or a scikit-learn ``"probe"`` on the cached features)."""
    name: str
    run_fold: Callable[[Fold, FoldInputs], dict]
    #: reads the shared FeatureCache, encoded once for every frozen protocol of a run
    frozen: bool
    #: needs the cache to keep layer4[0]'s maps, not only the pooled features
    keeps_maps: bool = False
    #: None: ``--selection`` chooses its epoch / C; else why it selects nothing ({flag} fields)
    no_selection_note: str | None = None
    #: gives a network to explain (Grad-CAM) or save (``--save_classifiers``)
    explainable: bool = True
    #: what differs from the paper's protocol, in every result JSON ("protocol_note")
    note: str | None = None

    @property
    def selects(self) -> bool:
        return self.no_selection_note is None


FINETUNE_CACHED_NOTE = ("the paper's finetune (layer4.1 + new head trained, Adam, cosine schedule, batch, seed) "
                        "on cached layer4.0 outputs: conv1..layer4.0 frozen in eval mode (their BatchNorm "
                        "statistics are the encoder's, not adapted to POCUS as upstream's model.train()), no "
                        "RandomResizedCrop/flip augmentation, epochs = config.epochs; see evaluation/protocols.py")

PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (
    Protocol("finetune", lambda fold, i: run_finetune_fold(fold, i.state, i.args, i.device), frozen=False),
    Protocol("linear", lambda fold, i: run_linear_fold(fold, i.features, i.args), frozen=True),
    Protocol("knn", lambda fold, i: run_knn_fold(fold, i.features, i.args), frozen=True, explainable=False,
             no_selection_note="none: k = {knn_k} is fixed (--knn_k), so --selection chooses nothing for knn "
                               "(last, val and paper give the same result)"),
    Protocol("finetune_cached", lambda fold, i: run_finetune_cached_fold(fold, i.features, i.args, i.device),
             frozen=True, keeps_maps=True, note=FINETUNE_CACHED_NOTE),
)}


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
