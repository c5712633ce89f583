"""The evaluation library; ``evaluation_aclus.py`` (classification) and
``evaluation_segmentation.py`` are its command lines.

data (folds, discovery, transforms) -> features (the frozen encoder's outputs, once per image)
-> protocols (the registry: finetune, linear, knn, finetune_cached) -> runner (a run and its
reports); explain (Grad-CAM of the trained classifiers), cam_experiment (a test of the maps),
segmentation (the dense downstream task).
"""
