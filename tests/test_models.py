"""The detector: inputs and outputs, padding, backbones, position encodings, build_detr, sizes and keys."""
import math
import re
import urllib.error

import pytest
import torch
import torchvision
from torchvision.ops import FrozenBatchNorm2d

from detr_irpe.config import Config, ModelConfig
from detr_irpe.models import (PositionEmbeddingLearned, PositionEmbeddingSine, PostProcess, Transformer,
                              build_backbone, build_detr)
from helpers import TINY

SMALL_R18 = dict(backbone="resnet18", backbone_weights="none", hidden_dim=64, nheads=4, enc_layers=2, dec_layers=2,
                 dim_feedforward=128, num_queries=10, num_classes=5)
RPE = "rpe-2.0-product-ctx-1-k"


def randomize_rpe_tables(model, seed=0):
    """Non-zero iRPE tables, so that the encoding actually changes the attention."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lookup_table" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)


# -- forward / backward ---------------------------------------------------------------------


@pytest.mark.parametrize("rpe", [None, RPE])
def test_tiny_forward_backward_on_images_of_different_sizes(rpe):
    torch.manual_seed(0)
    model, criterion, _ = build_detr(**TINY, rpe=rpe)
    images = [torch.randn(3, 96, 128), torch.randn(3, 64, 70), torch.randn(3, 120, 64)]
    out = model(images)
    assert out["pred_logits"].shape == (3, 5, 5)  # K + 1 = 5 classes
    assert out["pred_boxes"].shape == (3, 5, 4)
    assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()
    assert len(out["aux_outputs"]) == 1
    assert out["aux_outputs"][0]["pred_logits"].shape == (3, 5, 5)
    assert out["aux_outputs"][0]["pred_boxes"].shape == (3, 5, 4)
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])}] * 3
    criterion.weighted_loss(criterion(out, targets)).backward()
    assert model.class_embed.weight.grad is not None and model.backbone[0].body.stage0.conv.weight.grad is not None


def test_without_aux_loss_there_are_no_aux_outputs():
    model, criterion, _ = build_detr(**TINY, aux_loss=False)
    assert "aux_outputs" not in model([torch.randn(3, 64, 64)])
    assert set(criterion.weight_dict) == {"loss_ce", "loss_bbox", "loss_giou"}


def test_pre_norm_adds_an_encoder_norm():
    post, _, _ = build_detr(**TINY)
    pre, _, _ = build_detr(**TINY, pre_norm=True)
    assert post.transformer.encoder.norm is None
    assert isinstance(pre.transformer.encoder.norm, torch.nn.LayerNorm)
    assert set(pre.state_dict()) - set(post.state_dict()) == {"transformer.encoder.norm.weight",
                                                              "transformer.encoder.norm.bias"}
    assert pre([torch.randn(3, 64, 64)])["pred_boxes"].shape == (1, 5, 4)


def test_list_input_equals_padded_batch_with_mask():
    torch.manual_seed(0)
    model, _, _ = build_detr(**TINY, rpe=RPE)
    randomize_rpe_tables(model)
    model.eval()
    images = [torch.randn(3, 96, 128), torch.randn(3, 64, 70)]
    batch = torch.zeros(2, 3, 96, 128)
    mask = torch.ones(2, 96, 128, dtype=torch.bool)
    for i, img in enumerate(images):
        batch[i, :, : img.shape[1], : img.shape[2]] = img
        mask[i, : img.shape[1], : img.shape[2]] = False
    with torch.no_grad():
        from_list, from_batch = model(images), model(batch, mask)
        unpadded = model(torch.stack([images[0]]))  # a tensor without mask: no padding
    torch.testing.assert_close(from_list["pred_logits"], from_batch["pred_logits"])
    torch.testing.assert_close(from_list["pred_boxes"], from_batch["pred_boxes"])
    torch.testing.assert_close(unpadded["pred_boxes"][0], from_list["pred_boxes"][0])


def test_rejects_malformed_input():
    model, _, _ = build_detr(**TINY)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match="mask shape"):
        model(torch.randn(2, 3, 64, 64), torch.zeros(2, 32, 64, dtype=torch.bool))
    with pytest.raises(ValueError, match="list of images is padded here"):
        model([torch.randn(3, 64, 64)], torch.zeros(1, 64, 64, dtype=torch.bool))


# -- padding --------------------------------------------------------------------------------


def test_transformer_ignores_padding_including_irpe():
    """Padded cells (whatever they hold) change nothing for the valid cells: keys are masked,
    positions are counted from the top-left, and iRPE offsets between valid cells are the same
    on the padded grid."""
    torch.manual_seed(0)
    transformer = Transformer(d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64,
                              dropout=0.0, rpe=RPE).eval()
    randomize_rpe_tables(transformer)
    sine = PositionEmbeddingSine(16)
    src = torch.randn(1, 32, 3, 4)
    padded = torch.randn(1, 32, 5, 7)  # random padding content
    padded[:, :, :3, :4] = src
    mask = torch.zeros(1, 3, 4, dtype=torch.bool)
    padded_mask = torch.ones(1, 5, 7, dtype=torch.bool)
    padded_mask[:, :3, :4] = False
    queries = torch.randn(6, 32)
    with torch.no_grad():
        hs, memory, _ = transformer(src, mask, queries, sine(mask))
        hs_p, memory_p, _ = transformer(padded, padded_mask, queries, sine(padded_mask))
    torch.testing.assert_close(memory_p[:, :, :3, :4], memory, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hs_p, hs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rpe", [None, RPE])
def test_padding_effect_of_batching_is_bounded(rpe):
    """How far an image's predictions move when it is batched beside a larger image.

    The transformer ignores padding exactly (test above); what remains comes from the CNN:
    near the bottom/right border its convolutions read the padded area, which is zero beside
    the image but holds activations leaking out of the image deeper in the network, and the
    mask is downsampled to the feature grid. Measured (random init, this config, eval mode):
    max |delta box| 0.017 / 0.016 and max |delta prob| 0.039 / 0.038 (plain / iRPE).
    """
    torch.manual_seed(0)
    model, _, _ = build_detr(**SMALL_R18, rpe=rpe)
    randomize_rpe_tables(model)
    model.eval()
    small, large = torch.randn(3, 80, 72), torch.randn(3, 128, 128)
    with torch.no_grad():
        alone, beside = model([small]), model([small, large])
    box_shift = (alone["pred_boxes"][0] - beside["pred_boxes"][0]).abs().max().item()
    prob_shift = (alone["pred_logits"][0].softmax(-1) - beside["pred_logits"][0].softmax(-1)).abs().max().item()
    assert box_shift < 0.05 and prob_shift < 0.12, (box_shift, prob_shift)


# -- iRPE -------------------------------------------------------------------------------------


def test_fresh_irpe_model_equals_its_plain_twin():
    torch.manual_seed(0)
    plain, _, _ = build_detr(**TINY)
    irpe, _, _ = build_detr(**TINY, rpe="rpe-1.9-product-ctx-0-qkv")
    tables = {n: p for n, p in irpe.named_parameters() if "lookup_table" in n}
    assert tables and all(torch.count_nonzero(p) == 0 for p in tables.values())
    missing, unexpected = irpe.load_state_dict(plain.state_dict(), strict=False)
    assert set(missing) == set(tables) and not unexpected
    plain.eval(), irpe.eval()
    images = [torch.randn(3, 64, 96), torch.randn(3, 96, 64)]
    with torch.no_grad():
        torch.testing.assert_close(irpe(images)["pred_boxes"], plain(images)["pred_boxes"])


def test_attention_maps_on_request():
    torch.manual_seed(0)
    model, _, _ = build_detr(**TINY, rpe=RPE)
    model.eval()
    images = [torch.randn(3, 96, 128), torch.randn(3, 64, 64)]
    assert "attention" not in model(images)
    out = model(images, return_attention=True)
    h, w = out["feature_hw"]
    assert (h, w) == (6, 8)  # stride 16
    (enc,), dec = out["attention"]["encoder"], out["attention"]["decoder"]
    assert enc.shape == (2, h * w, h * w) and len(dec) == 2 and dec[0].shape == (2, 5, h * w)
    torch.testing.assert_close(enc.sum(-1), torch.ones(2, h * w))
    # image 1 covers the top-left 4 x 4 feature cells: no attention goes to its padding
    padding = torch.ones(h, w, dtype=torch.bool)
    padding[:4, :4] = False
    assert enc[1][:, padding.flatten()].abs().max() == 0
    assert dec[-1][1][:, padding.flatten()].abs().max() == 0


# -- backbones ----------------------------------------------------------------------------------


def test_resnet_freezes_stem_and_layer1_and_uses_frozen_bn():
    backbone = build_backbone("resnet18", "none", train_backbone=True)
    trainable = {n.split(".")[0] for n, p in backbone.body.named_parameters() if p.requires_grad}
    frozen = {n.split(".")[0] for n, p in backbone.body.named_parameters() if not p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"} and frozen == {"conv1", "layer1"}
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules())
    assert not any(p.requires_grad for p in build_backbone("resnet18", "none", train_backbone=False).parameters())
    assert not any(p.requires_grad for p in build_backbone("tiny", "none", train_backbone=False).parameters())


@pytest.mark.parametrize("name,dilation,channels,stride", [("resnet18", False, 512, 32), ("resnet50", True, 2048, 16),
                                                           ("tiny", False, 128, 16)])
def test_feature_map_stride_and_mask(name, dilation, channels, stride):
    backbone = build_backbone(name, "none", dilation=dilation).eval()
    assert backbone.num_channels == channels and backbone.stride == stride
    images = torch.zeros(2, 3, 128, 192)
    mask = torch.ones(2, 128, 192, dtype=torch.bool)
    mask[0] = False
    mask[1, :64, :96] = False
    with torch.no_grad():
        features, feature_mask = backbone(images, mask)
    h, w = 128 // stride, 192 // stride
    assert features.shape == (2, channels, h, w) and feature_mask.shape == (2, h, w)
    assert not feature_mask[0].any()
    assert (~feature_mask[1]).sum() == (h // 2) * (w // 2) and not feature_mask[1, : h // 2, : w // 2].any()


def test_backbone_weights_from_a_local_file(tmp_path):
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), tmp_path / "r18.pth")
    backbone = build_backbone("resnet18", str(tmp_path / "r18.pth"))
    torch.testing.assert_close(backbone.body.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    torch.testing.assert_close(backbone.body.layer2[0].bn1.running_var, reference.layer2[0].bn1.running_var)
    with pytest.raises(FileNotFoundError, match="neither 'imagenet', 'none' nor an existing file"):
        build_backbone("resnet18", str(tmp_path / "missing.pth"))
    torch.save(torchvision.models.resnet34().state_dict(), tmp_path / "r34.pth")
    with pytest.raises(RuntimeError, match="is not a torchvision resnet18 state dict"):
        build_backbone("resnet18", str(tmp_path / "r34.pth"))


def test_imagenet_download_offline_says_what_to_do(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError, match="could not download the ImageNet weights of resnet18") as info:
        build_backbone("resnet18", "imagenet")
    assert "backbone_weights=none" in str(info.value) and "local path" in str(info.value)


def test_unsupported_backbone_options():
    with pytest.raises(ValueError, match="backbone_weights=none"):
        build_backbone("tiny", "imagenet")
    with pytest.raises(ValueError, match="ResNet backbones only"):
        build_backbone("tiny", "none", dilation=True)
    with pytest.raises(ValueError, match="resnet50 or resnet101"):
        build_backbone("resnet34", "none", dilation=True)
    with pytest.raises(ValueError, match="unknown backbone 'resnet9'"):
        build_backbone("resnet9", "none")


# -- position encodings -------------------------------------------------------------------------


def test_sine_encoding_values():
    mask = torch.ones(1, 4, 6, dtype=torch.bool)
    mask[0, :3, :5] = False  # valid 3 x 5
    pos = PositionEmbeddingSine(num_pos_feats=8)(mask)
    assert pos.shape == (1, 16, 4, 6)
    for i, j in [(0, 0), (2, 4), (1, 3)]:
        y = (i + 1) / 3 * 2 * math.pi
        x = (j + 1) / 5 * 2 * math.pi
        for k in range(4):
            wavelength = 10000 ** (2 * k / 8)
            expected = [math.sin(y / wavelength), math.cos(y / wavelength)]
            expected_x = [math.sin(x / wavelength), math.cos(x / wavelength)]
            assert pos[0, 2 * k: 2 * k + 2, i, j].tolist() == pytest.approx(expected, abs=1e-5)
            assert pos[0, 8 + 2 * k: 8 + 2 * k + 2, i, j].tolist() == pytest.approx(expected_x, abs=1e-5)


def test_learned_encoding():
    embed = PositionEmbeddingLearned(num_pos_feats=8)
    assert embed.row_embed.weight.shape == embed.col_embed.weight.shape == (50, 8)
    pos = embed(torch.zeros(2, 3, 5, dtype=torch.bool))
    assert pos.shape == (2, 16, 3, 5)
    torch.testing.assert_close(pos[1, :8, 2, 4], embed.col_embed.weight[4])
    torch.testing.assert_close(pos[0, 8:, 2, 4], embed.row_embed.weight[2])
    with pytest.raises(ValueError, match="at most 50 x 50"):
        embed(torch.zeros(1, 51, 3, dtype=torch.bool))
    model, _, _ = build_detr(**TINY, position_embedding="learned")
    assert model.backbone[1].row_embed.weight.shape == (50, 16)
    assert model([torch.randn(3, 64, 64)])["pred_boxes"].shape == (1, 5, 4)


# -- post-processing --------------------------------------------------------------------------------


def test_postprocess_to_absolute_boxes():
    outputs = {"pred_logits": torch.tensor([[[1.0, 2.0, 5.0], [3.0, 0.0, 0.0]]]),
               "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.75, 0.5, 0.5]]])}
    (result,) = PostProcess()(outputs, torch.tensor([[100, 200]]))  # height 100, width 200
    probs = outputs["pred_logits"][0].softmax(-1)
    assert result["labels"].tolist() == [1, 0]  # "no object" excluded from the max
    torch.testing.assert_close(result["scores"], torch.stack([probs[0, 1], probs[1, 0]]))
    torch.testing.assert_close(result["boxes"], torch.tensor([[80.0, 30.0, 120.0, 70.0], [0.0, 50.0, 100.0, 100.0]]))
    with pytest.raises(ValueError, match="target_sizes"):
        PostProcess()(outputs, torch.tensor([100, 200]))


# -- build_detr -----------------------------------------------------------------------------------


def test_build_detr_accepts_model_config_full_config_and_kwargs():
    cfg = ModelConfig(**TINY)
    for model, criterion, post in (build_detr(cfg), build_detr(Config(model=cfg)), build_detr(**TINY)):
        assert model.num_queries == 5 and model.class_embed.out_features == 5 and criterion.num_classes == 4
        assert isinstance(post, PostProcess)
    model, _, _ = build_detr(cfg, num_queries=7)  # keyword overrides on top of a config
    assert model.query_embed.weight.shape == (7, 32) and cfg.num_queries == 5


def test_build_detr_errors_are_clear():
    with pytest.raises(TypeError, match="unknown model option 'hiden_dim'. Did you mean 'hidden_dim'"):
        build_detr(**TINY, hiden_dim=8)
    with pytest.raises(ValueError, match="num_classes is None"):
        build_detr(**{**TINY, "num_classes": None})
    with pytest.raises(ValueError, match="nheads"):
        build_detr(**{**TINY, "nheads": 5})
    with pytest.raises(ValueError, match="malformed iRPE spec"):
        build_detr(**TINY, rpe="rpe-2.0-spiral-ctx-1-k")


# -- reference sizes and checkpoint keys -------------------------------------------------------------


@pytest.mark.parametrize("rpe,expected", [(None, 41_524_768), ("rpe-2.0-product-ctx-1-k", 41_540_320),
                                          ("rpe-1.9-product-ctx-1-k", 41_534_176)])
def test_detr_r50_parameter_count(rpe, expected):
    model, _, _ = build_detr(backbone_weights="none", num_classes=91, num_queries=100, rpe=rpe)
    assert sum(p.numel() for p in model.parameters()) == expected


BN = ("weight", "bias", "running_mean", "running_var")
WB = ("weight", "bias")
ATTN = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")


def official_detr_r50_shapes(num_classes=91, num_queries=100, d=256, ffn=2048, layers=6):
    """Keys and shapes of facebookresearch/detr's detr-r50 checkpoint, from its known structure."""
    shapes = {}
    body = "backbone.0.body"

    def conv_bn(prefix, conv, bn, out_ch, in_ch, k):
        shapes[f"{prefix}.{conv}.weight"] = (out_ch, in_ch, k, k)
        shapes.update({f"{prefix}.{bn}.{b}": (out_ch,) for b in BN})

    conv_bn(body, "conv1", "bn1", 64, 3, 7)
    in_ch = 64
    for layer, (blocks, width) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for i in range(blocks):
            p = f"{body}.layer{layer}.{i}"
            conv_bn(p, "conv1", "bn1", width, in_ch, 1)
            conv_bn(p, "conv2", "bn2", width, width, 3)
            conv_bn(p, "conv3", "bn3", 4 * width, width, 1)
            if i == 0:
                conv_bn(p, "downsample.0", "downsample.1", 4 * width, in_ch, 1)
            in_ch = 4 * width

    def attention(prefix):
        shapes.update({f"{prefix}.in_proj_weight": (3 * d, d), f"{prefix}.in_proj_bias": (3 * d,),
                       f"{prefix}.out_proj.weight": (d, d), f"{prefix}.out_proj.bias": (d,)})

    def ffn_and_norms(prefix, norms):
        shapes.update({f"{prefix}.linear1.weight": (ffn, d), f"{prefix}.linear1.bias": (ffn,),
                       f"{prefix}.linear2.weight": (d, ffn), f"{prefix}.linear2.bias": (d,)})
        shapes.update({f"{prefix}.norm{n}.{w}": (d,) for n in range(1, norms + 1) for w in WB})

    for n in range(layers):
        attention(f"transformer.encoder.layers.{n}.self_attn")
        ffn_and_norms(f"transformer.encoder.layers.{n}", 2)
        attention(f"transformer.decoder.layers.{n}.self_attn")
        attention(f"transformer.decoder.layers.{n}.multihead_attn")
        ffn_and_norms(f"transformer.decoder.layers.{n}", 3)
    shapes.update({"transformer.decoder.norm.weight": (d,), "transformer.decoder.norm.bias": (d,),
                   "class_embed.weight": (num_classes + 1, d), "class_embed.bias": (num_classes + 1,),
                   "bbox_embed.layers.0.weight": (d, d), "bbox_embed.layers.0.bias": (d,),
                   "bbox_embed.layers.1.weight": (d, d), "bbox_embed.layers.1.bias": (d,),
                   "bbox_embed.layers.2.weight": (4, d), "bbox_embed.layers.2.bias": (4,),
                   "query_embed.weight": (num_queries, d),
                   "input_proj.weight": (d, 2048, 1, 1), "input_proj.bias": (d,)})
    return shapes


def test_detr_r50_state_dict_matches_the_official_checkpoint_layout():
    expected = official_detr_r50_shapes()
    model, _, _ = build_detr(backbone_weights="none", num_classes=91, num_queries=100)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sorted(set(got) - set(expected)) == [] and sorted(set(expected) - set(got)) == []
    assert got == expected
    assert not any(re.search(r"num_batches_tracked|encoder\.norm", k) for k in got)


def test_irpe_and_learned_position_keys():
    model, _, _ = build_detr(backbone_weights="none", num_classes=91, num_queries=100, rpe=RPE,
                             position_embedding="learned")
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    extra = {k: s for k, s in got.items() if k not in official_detr_r50_shapes()}
    expected_extra = {f"transformer.encoder.layers.{n}.self_attn.rpe_k.lookup_table_weight": (1, 32, 81)
                      for n in range(6)}
    expected_extra.update({"backbone.1.row_embed.weight": (50, 128), "backbone.1.col_embed.weight": (50, 128)})
    assert extra == expected_extra
