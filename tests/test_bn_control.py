"""study/bn_control.py: the start's weights, the corpus's BatchNorm statistics."""
from __future__ import annotations

import numpy as np
import torch

from models.aclus import ACLUS
from study.bn_control import corpus_statistics, main, start_encoder
from utils.io import atomic_write_png


def test_start_encoder_is_the_pretraining_models_start():
    torch.manual_seed(3)
    model = ACLUS("aclus", proj_hidden=8, proj_dim=8, pred_hidden=8)   # as pretrain_aclus builds it
    start = start_encoder(3).state_dict()
    for k, v in model.encoder.resnet.state_dict().items():
        assert torch.equal(v, start[k]), k


def test_statistics_are_the_corpus_mean_and_weights_do_not_move():
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(4, 3, 32, 32, generator=g) * 2 + 1 for _ in range(3)]  # equal sizes
    model = start_encoder(0)
    before = {k: v.clone() for k, v in model.named_parameters()}
    corpus_statistics(model, batches)
    for k, v in model.named_parameters():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():   # bn1's mean = the mean of conv1's output over every pixel of every batch
        ref = torch.cat([model.conv1(x) for x in batches]).mean(dim=(0, 2, 3))
    torch.testing.assert_close(model.bn1.running_mean, ref, atol=1e-5, rtol=1e-4)
    assert not model.training


def test_cli_writes_a_torchvision_encoder(tmp_path):
    import torchvision

    rng = np.random.default_rng(0)
    for i in range(5):
        atomic_write_png(rng.integers(0, 255, (40, 50), dtype=np.uint8), tmp_path / "frames/V/img" / f"f{i}.png")
    out = tmp_path / "enc" / "encoder_resnet18.pth"
    assert main(["--frames", str(tmp_path / "frames"), "--out", str(out), "--img_size", "32", "--batch_size", "2"]) == 0
    sd = torch.load(out, weights_only=True)
    missing, unexpected = torchvision.models.resnet18().load_state_dict(sd, strict=False)
    assert set(missing) == {"fc.weight", "fc.bias"} and not unexpected
    assert main(["--frames", str(tmp_path / "nothing"), "--out", str(out)]) == 2


def test_start_statistics_write_the_random_start_unchanged(tmp_path):
    """The random-init arm of seed s is the pre-training start of seed s (fresh BatchNorm statistics);
    a seed mix-up or corpus statistics leaking into it fails."""
    out = tmp_path / "encoder_resnet18.pth"
    assert main(["--statistics", "start", "--seed", "3", "--out", str(out)]) == 0
    sd = torch.load(out, weights_only=True)
    ref = {k: v for k, v in start_encoder(3).state_dict().items() if not k.startswith("fc.")}
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in sd)
    assert torch.equal(sd["bn1.running_mean"], torch.zeros(64))
    other = start_encoder(4).state_dict()
    assert not torch.equal(sd["conv1.weight"], other["conv1.weight"])
