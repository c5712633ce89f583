"""Frozen-encoder outputs shared by the frozen-feature protocols of one evaluation run."""
from __future__ import annotations

import hashlib
import time

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from evaluation.data import ArrayDataset, make_transforms
from models.encoder_io import build_resnet18
from utils.distributed import seed_everything
from utils.pocus_folds import CLASSES as POCUS_CLASSES


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
