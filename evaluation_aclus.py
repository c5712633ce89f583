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

Protocols: ``finetune`` (the paper's), ``linear``, ``knn``, ``finetune_cached`` (the paper's fine-tune on
cached ``layer4.0`` maps, ~5x cheaper on a CPU): what each does and why, :mod:`evaluation.protocols`.

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
``evaluation/gradcam.py``): after each fold, the fold's classifier (finetune: the selected
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
N_test x H x W bool, row-aligned with ``X_test``; ``evaluation.cam_shares.write_synthetic_cam_masks``
writes them for synthetic scans), inside the class-defining region. ``--save_classifiers``
writes each fold's classifier (weights only) to ``classifiers/`` for ``gradcam_aclus.py``.
"""
from __future__ import annotations

import sys

from evaluation.runner import evaluate, get_args_parser
from utils.io import DataError


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
