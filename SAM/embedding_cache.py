"""Frozen-encoder embeddings computed once per image (stage 2 and the benchmark).

In stage 2 the image encoder is frozen, so its output for an un-augmented image never
changes; encoding each image once instead of once per epoch is what makes stage 2
practical on a CPU (LiteMedSAM's encoder costs seconds per image there).
Embeddings are kept as float16 on the CPU: 256×64×64 (lite) is 2 MiB per image.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from tqdm import tqdm

from SAM.samus_data import SAMUSDataset
from SAM.segmenter import PromptableSegmenter
from utils.checkpoint import safe_torch_load
from utils.io import atomic_torch_save


def encoder_fingerprint(seg: PromptableSegmenter) -> str:
    """Short hash of the encoder weights and input size: names a disk cache safely."""
    h = hashlib.sha1(f"{seg.backbone}/{seg.img_size}".encode())
    for name, t in seg.image_encoder.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1)[:4096].float().numpy().tobytes())
    return h.hexdigest()[:12]


class EmbeddingCache:
    """image_key ("<Dataset>/<name>") -> (256, g, g) float16 embedding."""

    def __init__(self, seg: PromptableSegmenter, device: torch.device, batch_size: int = 8,
                 cache_dir: str | Path | None = None):
        self.seg, self.device, self.batch_size = seg, device, batch_size
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.fingerprint = encoder_fingerprint(seg)
        self.store: dict[str, torch.Tensor] = {}

    def _file(self, ds: SAMUSDataset) -> Path:
        return self.cache_dir / f"emb_{self.fingerprint}_{ds.root.name}.pt"

    @torch.no_grad()
    def fill(self, ds: SAMUSDataset) -> None:
        """Encode every image of ``ds`` not cached yet (deduplicated over class lines)."""
        if self.cache_dir is not None and not self.store and self._file(ds).is_file():
            self.store.update(safe_torch_load(self._file(ds), "embedding cache"))
        todo = sorted({l.image_key: l for l in ds.lines if l.image_key not in self.store}.items())
        if not todo:
            return
        self.seg.image_encoder.eval()
        for i in tqdm(range(0, len(todo), self.batch_size), desc="encode (cached once)",
                      dynamic_ncols=True):
            chunk = todo[i:i + self.batch_size]
            imgs = torch.stack([ds.image_tensor(ds.load_pair(line)[0]) for _, line in chunk])
            emb = self.seg.embed(imgs.to(self.device)).half().cpu()
            for (key, _), e in zip(chunk, emb):
                self.store[key] = e.clone()
        if self.cache_dir is not None:
            atomic_torch_save(self.store, self._file(ds))

    def batch(self, ds: SAMUSDataset, index: torch.Tensor) -> torch.Tensor:
        """(B,) dataset indices -> (B, 256, g, g) float32 on the device."""
        embs = [self.store[ds.lines[int(i)].image_key] for i in index]
        return torch.stack(embs).to(self.device).float()
