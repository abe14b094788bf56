"""Hugging Face transformers DETR <-> ours, checked against transformers itself.

Each transformers model is small (d_model 32, 2 + 2 layers), built with random weights made
non-trivial (batch-norm statistics, biases, layer-norm scales), saved with ``save_pretrained``
and run next to ours on two real COCO images of different sizes, batched with padding.
"""
import json
import re
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoImageProcessor, DetrConfig, DetrForObjectDetection, ResNetConfig

from helpers import COCO, run_python, tiny_overrides, tool
from detr_irpe import Detector
from detr_irpe.config import DataConfig, load_config
from detr_irpe.data import IMAGENET_MEAN, IMAGENET_STD, CocoDetection, collate_fn, make_eval_transforms
from detr_irpe.data.images import read_rgb
from detr_irpe.engine.checkpoint import load_checkpoint_file, state_dict_from_checkpoint
from detr_irpe.engine.convert import convert_checkpoint
from detr_irpe.engine.inference import load_detector
from detr_irpe.engine.train import Trainer
from detr_irpe.errors import CheckpointError
from detr_irpe.interop import checkpoint_from_hf, read_hf_config, read_safetensors_weights
from detr_irpe.models import build_detr

ATOL = 1e-4
SMALL = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
             encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=5, use_pretrained_backbone=False)
LABELS = {0: "N/A", 1: "person", 2: "bicycle", 3: "car"}
BACKBONES = {  # the timm one also has learned position embeddings, the others sine ones
    "timm": dict(use_timm_backbone=True, backbone="resnet18", position_embedding_type="learned"),
    "native": dict(use_timm_backbone=False, backbone_config=ResNetConfig(
        layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], out_features=["stage4"])),
    "dc5": dict(use_timm_backbone=True, backbone="resnet50", dilation=True),  # our DC5 needs a bottleneck ResNet
}
EXPECTED = {"timm": ("resnet18", False, "learned"), "native": ("resnet18", False, "sine"),
            "dc5": ("resnet50", True, "sine")}
KINDS = list(BACKBONES)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: a second thread saves little and, on a busy machine, its waits at
    every parallel region cost far more than the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randomise_(model: torch.nn.Module, seed: int) -> None:
    """Weights that make every tensor count: He-initialised convolutions, batch norm with its own
    statistics and affine terms, non-zero biases, layer norms that are not the identity."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if key.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            elif t.dim() == 4:
                t.copy_(torch.randn(t.shape, generator=gen) * (2.0 / t[0].numel()) ** 0.5)
            elif t.dim() == 2:
                t.copy_(torch.randn(t.shape, generator=gen) * t.shape[-1] ** -0.5)
            elif key.endswith("weight"):  # batch / layer norm scales
                t.copy_(torch.rand(t.shape, generator=gen) + 0.5)
            else:  # biases, batch-norm means
                t.copy_(torch.randn(t.shape, generator=gen) * 0.1)


def hf_model(kind: str, seed: int = 0, **overrides) -> DetrForObjectDetection:
    config = DetrConfig(**SMALL, **BACKBONES[kind], id2label=LABELS, **overrides)
    model = DetrForObjectDetection(config).eval()
    randomise_(model, seed)
    return model


@pytest.fixture(scope="module")
def batch():
    """Two COCO val images, 96 x 129 and 144 x 96 (h x w) after resizing, padded: ``(images, mask)``."""
    dataset = CocoDetection(COCO / "val2017", COCO / "annotations" / "instances_val2017.json",
                            make_eval_transforms(DataConfig(eval_size=96, max_size=144)))
    images, mask, _ = collate_fn([dataset[0], dataset[1]])  # 500 x 370 and 425 x 640 (w x h) originals
    assert images.shape[-2:] == (144, 129) and mask[0, 96:].all() and mask[1, :, 96:].all()
    return images, mask


@dataclass
class Built:
    model: DetrForObjectDetection
    folder: Path  # written by save_pretrained
    outputs: tuple  # transformers' (logits, pred_boxes) on the batch


@pytest.fixture(scope="module")
def hf(tmp_path_factory, batch):
    """``hf(kind)``: the transformers model of that backbone kind, built once per module."""
    built = {}

    def get(kind: str) -> Built:
        if kind not in built:
            model = hf_model(kind)
            folder = tmp_path_factory.mktemp(f"hf_{kind}")
            model.save_pretrained(folder)
            built[kind] = Built(model, folder, run_hf(model, batch))
        return built[kind]

    return get


def run_hf(model, batch):
    images, mask = batch
    with torch.no_grad():
        out = model(pixel_values=images, pixel_mask=(~mask).long())  # transformers: 1 on real pixels
    return out.logits, out.pred_boxes


def run_ours(model, batch):
    images, mask = batch
    with torch.no_grad():
        out = model(images, mask)  # ours: True on padding
    return out["pred_logits"], out["pred_boxes"]


def max_diff(ours, theirs):
    return max(float((a - b).abs().max()) for a, b in zip(ours, theirs))


# -- transformers -> ours ------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_transformers_model_loads_with_the_same_outputs(hf, kind, batch):
    built = hf(kind)
    detector = load_detector(str(built.folder))
    m = detector.config.model
    assert (m.backbone, m.dilation, m.position_embedding) == EXPECTED[kind]
    assert (m.hidden_dim, m.nheads, m.enc_layers, m.dec_layers, m.dim_feedforward, m.num_queries, m.num_classes,
            m.rpe) == (32, 2, 2, 2, 64, 5, len(LABELS), None)
    assert detector.categories == LABELS
    logits, boxes = built.outputs
    assert logits.std() > 0.3 and boxes.std() > 0.05  # outputs that vary: a wrong tensor shows
    diff = max_diff(run_ours(detector.model, batch), built.outputs)
    print(f"{kind}: max |ours - transformers| = {diff:.2e}")
    assert diff < ATOL


@pytest.mark.parametrize("kind", KINDS)
def test_a_wrong_mapping_would_not_pass(hf, kind, batch):
    """Swapping two same-shaped tensors, what a wrong key mapping does, moves the outputs far past ATOL."""
    built = hf(kind)
    model = load_detector(str(built.folder)).model
    state = model.state_dict()
    body = "backbone.0.body.layer4.1."
    swaps = [(body + "bn1.running_var", body + "bn2.running_var")]  # a backbone mix-up
    if kind == "timm":
        swaps.append(("transformer.encoder.layers.0.self_attn.in_proj_weight", None))  # q <-> k
    for a, b in swaps:
        original = {k: state[k].clone() for k in (a, b) if k}
        with torch.no_grad():
            if b is None:
                q, k, v = state[a].chunk(3)
                state[a].copy_(torch.cat([k, q, v]))
            else:
                state[a].copy_(original[b])
                state[b].copy_(original[a])
        assert max_diff(run_ours(model, batch), built.outputs) > 100 * ATOL, (a, b)
        model.load_state_dict({**state, **original})


@pytest.mark.parametrize("kind", KINDS)
def test_other_key_layouts_and_pytorch_model_bin_read_the_same(hf, kind, tmp_path):
    """The installed transformers' module names (with transformers 5: ``o_proj``, ``mlp.fc1``,
    ``backbone.model``), as a state dict saved by hand has them, in a pytorch_model.bin read like
    the hub layout in model.safetensors."""
    built = hf(kind)
    reference = load_checkpoint_file(built.folder)["model"]
    shutil.copy(built.folder / "config.json", tmp_path)
    torch.save(built.model.state_dict(), tmp_path / "pytorch_model.bin")
    got = load_checkpoint_file(tmp_path)["model"]
    assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in got)


def test_learned_position_embeddings_of_transformers_4_and_5(hf, tmp_path):
    """transformers 4 saved them as ``model.backbone.position_embedding.*``, 5 as ``model.position_embedding.*``."""
    built = hf("timm")
    state = read_safetensors_weights(built.folder / "model.safetensors")
    v4, v5 = "model.backbone.position_embedding.", "model.position_embedding."
    saved_as = v5 if v5 + "row_embeddings.weight" in state else v4
    other = v4 if saved_as == v5 else v5
    shutil.copy(built.folder / "config.json", tmp_path)
    save_file({k.replace(saved_as, other): v for k, v in state.items()}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    got, reference = load_checkpoint_file(tmp_path)["model"], load_checkpoint_file(built.folder)["model"]
    assert got.keys() == reference.keys() and all(torch.equal(got[k], reference[k]) for k in got)
    assert torch.equal(got["backbone.1.row_embed.weight"], state[saved_as + "row_embeddings.weight"])


@pytest.mark.parametrize("kind", ["timm", "dc5"])
def test_config_json_of_the_hub_era_reads_the_same(hf, kind, tmp_path):
    """The layout of facebook/detr-resnet-50's config.json (transformers 4.x): the timm backbone is
    named at the top level (``backbone``, ``use_timm_backbone``, ``dilation``), no ``backbone_config``."""
    built = hf(kind)
    config = {k: v for k, v in read_hf_config(built.folder).items() if k != "backbone_config"}
    config.update(backbone=BACKBONES[kind]["backbone"], use_timm_backbone=True, use_pretrained_backbone=True,
                  dilation=kind == "dc5", max_position_embeddings=1024, scale_embedding=False, num_hidden_layers=2)
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(built.folder / "model.safetensors", tmp_path)
    got, reference = load_checkpoint_file(tmp_path), load_checkpoint_file(built.folder)
    assert got["config"] == reference["config"] and got["categories"] == reference["categories"]
    assert all(torch.equal(got["model"][k], v) for k, v in reference["model"].items())


@pytest.mark.parametrize("kind", KINDS)
def test_an_extra_missing_or_misshapen_key_is_named(hf, kind):
    folder = hf(kind).folder
    state = read_safetensors_weights(folder / "model.safetensors")
    config = read_hf_config(folder)

    def refused(weights, cfg=config):
        with pytest.raises(CheckpointError) as e:
            checkpoint_from_hf(weights, cfg)
        return str(e.value)

    message = refused(dict(state, **{"model.encoder.layers.0.adapter.weight": torch.zeros(2)}))
    assert re.search(r"correspond to nothing.*\n\s+model\.encoder\.layers\.0\.adapter\.weight", message)
    message = refused({k: v for k, v in state.items() if k != "model.decoder.layernorm.weight"})
    assert re.search(r"missing from the checkpoint \(1\):\n\s+transformer\.decoder\.norm\.weight\Z", message)
    message = refused({k: v for k, v in state.items() if k != "model.encoder.layers.1.self_attn.v_proj.bias"})
    assert re.search(r"q_proj, k_proj, v_proj of one shape \(1\):\n\s+transformer\.encoder\.layers\.1\.self_attn"
                     r"\.in_proj_bias: has only model\.encoder\.layers\.1\.self_attn\.q_proj\.bias, ", message)
    message = refused(state, dict(config, encoder_layers=1))  # the weights have a second encoder layer
    assert re.search(r"unexpected in the checkpoint \(not in the model\) \(\d+\):\n\s+transformer\.encoder\.layers\.1\."
                     r".* \(from model\.encoder\.layers\.1\.", message)
    message = refused(dict(state, **{"model.query_position_embeddings.weight": torch.zeros(5, 48)}))
    assert "query_embed.weight (from model.query_position_embeddings.weight): model expects [5, 32], " \
           "checkpoint has [5, 48]" in message


@pytest.mark.parametrize("change, message", [
    ({"auxiliary_loss": True}, "auxiliary_loss=true: transformers then feeds each decoder layer the layer-normed"),
    ({"activation_function": "gelu"}, "activation_function='gelu'"),
    ({"decoder_attention_heads": 4}, "encoder_attention_heads=2 differs from decoder_attention_heads=4"),
    ({"architectures": ["DetrModel"]}, "only DetrForObjectDetection"),
    ({"architectures": ["DetrForSegmentation"], "backbone_config": {"model_type": "timm_backbone", "backbone": "resnet50",
                                                                    "out_indices": [4]}}, "out_indices [4]"),
    ({"model_type": "conditional_detr"}, "model_type 'conditional_detr'"),
    ({"backbone_config": {"model_type": "timm_backbone", "backbone": "resnet50d"}}, "timm backbone 'resnet50d'"),
    ({"backbone_config": {"model_type": "timm_backbone", "backbone": "resnet50", "output_stride": 8}},
     "output stride 8"),
    ({"backbone_config": {"model_type": "resnet", "depths": [3, 4, 6, 3], "layer_type": "bottleneck"},
      "dilation": True}, "dilation=true with transformers' own ResNet"),
    ({"backbone_config": {"model_type": "resnet", "depths": [2, 2, 2, 2], "layer_type": "bottleneck"}},
     "depths=[2, 2, 2, 2]"),
    ({"backbone_config": {"model_type": "swin"}}, "model_type 'swin'"),
])
def test_config_fields_our_model_cannot_represent_are_refused(change, message):
    config = dict(DetrConfig(**SMALL, **BACKBONES["timm"]).to_dict(), **change)
    with pytest.raises(CheckpointError, match=r"(?s)hub model: .* cannot be represented .*" + re.escape(message)):
        checkpoint_from_hf({}, config, source="hub model")


def test_every_field_our_model_cannot_represent_is_listed_at_once():
    config = dict(DetrConfig(**SMALL, **BACKBONES["timm"]).to_dict(), auxiliary_loss=True,
                  backbone_config={"model_type": "swin"})
    with pytest.raises(CheckpointError, match=r"(?s)auxiliary_loss=true.*model_type 'swin'"):
        checkpoint_from_hf({}, config)


# -- ours -> transformers ------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_transformers_ours_transformers_gives_identical_tensors(hf, kind, tmp_path):
    folder = hf(kind).folder
    layout = "native" if kind == "native" else "timm"
    out = convert_checkpoint(folder, tmp_path / "back", "hf", hf_backbone=layout)
    before = read_safetensors_weights(folder / "model.safetensors")
    after = read_safetensors_weights(out / "model.safetensors")
    assert sorted(after) == sorted(before)
    assert all(after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]) for k in before)
    old, new = read_hf_config(folder), read_hf_config(out)
    for key in ("d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads", "decoder_attention_heads",
                "encoder_ffn_dim", "decoder_ffn_dim", "num_queries", "position_embedding_type", "id2label",
                "auxiliary_loss", "activation_function"):
        assert new[key] == old[key], key
    assert bool(new["dilation"]) == bool(old["dilation"])  # transformers 4 saves null for a native ResNet
    config = DetrConfig.from_pretrained(out)  # transformers reads the backbone as it was
    timm = config.backbone_config is None or config.backbone_config.model_type == "timm_backbone"
    assert timm == (kind != "native")


def test_written_folder_loads_in_transformers_with_every_tensor_and_the_same_outputs(hf, tmp_path, batch):
    """The timm model written with transformers' own ResNet (the default): other keys, same function."""
    built = hf("timm")
    out = convert_checkpoint(built.folder, tmp_path / "native", "hf")
    assert read_hf_config(out)["backbone_config"]["model_type"] == "resnet"
    reloaded, info = DetrForObjectDetection.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    diff = max_diff(run_hf(reloaded.eval(), batch), built.outputs)
    print(f"transformers (timm) -> ours -> transformers (native ResNet): max |diff| = {diff:.2e}")
    assert diff < ATOL


def our_checkpoint(path, rpe=None, backbone="resnet18", seed=5, categories=None, overrides=()):
    """A checkpoint of our trainer's format, with random batch-norm statistics."""
    cfg = load_config(None, [f"model.backbone={backbone}", "model.backbone_weights=none", "model.hidden_dim=32",
                             "model.nheads=2", "model.enc_layers=1", "model.dec_layers=2",
                             "model.dim_feedforward=64", "model.num_queries=4", "model.num_classes=5",
                             "model.position_embedding=learned", f"model.rpe={rpe}", *overrides])
    torch.manual_seed(seed)
    model, _, _ = build_detr(cfg.model)
    randomise_(model, seed)
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(),
                "categories": categories or {1: "person", 3: "car"}}, path)
    return model.eval()


def test_our_model_written_for_transformers_runs_the_same(tmp_path, batch, capsys):
    ours = our_checkpoint(tmp_path / "ours.pth")
    main = tool("convert_checkpoint").main
    main(["--to", "hf", str(tmp_path / "ours.pth"), str(tmp_path / "hf")])
    assert "wrote" in capsys.readouterr().out
    config = read_hf_config(tmp_path / "hf")
    assert config["id2label"] == {"0": "N/A", "1": "person", "2": "N/A", "3": "car", "4": "N/A"}
    assert config["use_timm_backbone"] is False  # transformers' own ResNet: no timm needed to load it
    assert config["use_pretrained_backbone"] is False  # from_pretrained must not fetch ImageNet weights
    theirs, info = DetrForObjectDetection.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info.values()), info
    diff = max_diff(run_ours(ours, batch), run_hf(theirs.eval(), batch))
    print(f"ours -> transformers: max |diff| = {diff:.2e}")
    assert diff < ATOL


def test_irpe_and_tiny_models_are_refused_for_transformers(tmp_path, capsys):
    our_checkpoint(tmp_path / "irpe.pth", rpe="rpe-2.0-product-ctx-1-k")
    with pytest.raises(CheckpointError, match="uses iRPE .*transformers' DETR has no relative position encoding"):
        convert_checkpoint(tmp_path / "irpe.pth", tmp_path / "hf", "hf")
    our_checkpoint(tmp_path / "tiny.pth", backbone="tiny")
    with pytest.raises(CheckpointError, match="backbone 'tiny' has no counterpart in transformers"):
        convert_checkpoint(tmp_path / "tiny.pth", tmp_path / "hf", "hf")
    assert not (tmp_path / "hf").exists()
    assert tool("convert_checkpoint").main(["--to", "hf", str(tmp_path / "irpe.pth"), str(tmp_path / "hf")]) == 1
    assert capsys.readouterr().err.startswith("error: cannot write this model as a Hugging Face")


# -- the transformers pipeline ----------------------------------------------------------------

EVAL_SIZE, MAX_SIZE = 320, 480
# val images whose resized size transformers computes as we do (the size test shows where it does not)
PIPELINE_IMAGES = ["000000223747.jpg", "000000343937.jpg", "000000521601.jpg"]
NAMES = {0: "cat", 1: "person", 2: "bicycle", 3: "car", 4: "dog"}  # every class named: names compare as they are
# Measured on PIPELINE_IMAGES: scores differ by at most 5e-7 (the input tensors by 5e-7, float rounding);
# boxes by up to 0.99 px, because the pipeline truncates box corners to whole pixels.
SCORE_TOL, BOX_TOL = 1e-5, 1.0
CORNERS = ("xmin", "ymin", "xmax", "ymax")


@pytest.fixture(scope="module")
def pipeline_checkpoint(tmp_path_factory):
    """Our checkpoint (evaluation size 320, at most 480) and the folder ``convert_checkpoint --to hf`` makes of it."""
    tmp = tmp_path_factory.mktemp("pipeline")
    our_checkpoint(tmp / "ours.pth", categories=NAMES,
                   overrides=[f"data.eval_size={EVAL_SIZE}", f"data.max_size={MAX_SIZE}"])
    return tmp / "ours.pth", convert_checkpoint(tmp / "ours.pth", tmp / "hf", to="hf")


def test_written_folder_prepares_images_as_our_evaluation(pipeline_checkpoint):
    """transformers' image processor, read from preprocessor_config.json, gives our evaluation input
    (to float rounding) whenever it resizes to the size we resize to; its rounding of that size differs
    from ours by at most one pixel (it rounds the short side where ours truncates)."""
    processor = AutoImageProcessor.from_pretrained(pipeline_checkpoint[1])
    assert type(processor).__name__ == "DetrImageProcessor"
    assert tuple(processor.image_mean) == IMAGENET_MEAN and tuple(processor.image_std) == IMAGENET_STD
    ours = make_eval_transforms(DataConfig(eval_size=EVAL_SIZE, max_size=MAX_SIZE))
    sizes = {}
    for path in sorted((COCO / "val2017").glob("*.jpg")):
        mine = ours(read_rgb(path))
        theirs = processor(images=Image.open(path).convert("RGB"), return_tensors="pt")
        assert theirs["pixel_mask"].all()  # one image: no padding
        pixels = theirs["pixel_values"][0]
        sizes[path.name] = (tuple(mine.shape[-2:]), tuple(pixels.shape[-2:]))
        if mine.shape == pixels.shape:
            assert float((mine - pixels).abs().max()) < 1e-5, path.name
    print("sizes (ours, transformers') that differ:", {k: v for k, v in sizes.items() if v[0] != v[1]})
    assert all(abs(a - b) <= 1 for mine, theirs in sizes.values() for a, b in zip(mine, theirs)), sizes
    assert all(sizes[name][0] == sizes[name][1] for name in PIPELINE_IMAGES)


def test_written_folder_detects_in_the_transformers_pipeline_as_our_detector(pipeline_checkpoint):
    checkpoint, folder = pipeline_checkpoint
    config = read_hf_config(folder)
    assert config["id2label"] == {str(i): name for i, name in NAMES.items()}
    assert config["label2id"] == {name: i for i, name in NAMES.items()}
    detect = transformers.pipeline("object-detection", model=str(folder), threshold=0.0)
    detector = Detector.from_checkpoint(checkpoint, device="cpu")
    worst = [0.0, 0.0]
    for name in PIPELINE_IMAGES:
        path = str(COCO / "val2017" / name)
        ours, theirs = detector.predict(path, threshold=0.0)[0], detect(path)
        assert len(ours) == len(theirs) == 4  # every query
        for found in ours:  # the same detection, wherever the pipeline lists it (it keeps query order)
            same = [t for t in theirs if t["label"] == found["name"]
                    and abs(t["score"] - found["score"]) <= SCORE_TOL
                    and max(abs(t["box"][c] - v) for c, v in zip(CORNERS, found["box"])) <= BOX_TOL]
            assert same, (name, found, theirs)
            worst[0] = max(worst[0], abs(same[0]["score"] - found["score"]))
            worst[1] = max(worst[1], max(abs(same[0]["box"][c] - v) for c, v in zip(CORNERS, found["box"])))
    print(f"pipeline vs Detector on {len(PIPELINE_IMAGES)} images: max |score diff| {worst[0]:.1e}, "
          f"max |box diff| {worst[1]:.2f} px")


def test_a_written_folder_read_back_keeps_our_resize(pipeline_checkpoint):
    checkpoint, folder = pipeline_checkpoint
    ours = torch.load(checkpoint, weights_only=True)["config"]["data"]
    back = load_checkpoint_file(folder)["config"]["data"]  # from its preprocessor_config.json
    assert (back["eval_size"], back["max_size"]) == (ours["eval_size"], ours["max_size"]) != (800, 1333)


# -- hub ids ---------------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 with an empty cache; yields the list of network connections tried (refused)."""
    import huggingface_hub.constants as hub

    attempts = []

    def no_network(*args, **kwargs):
        attempts.append(args)
        raise ConnectionRefusedError("a test tried to reach the network")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    return attempts


def test_hub_id_offline_reads_only_the_cache_and_says_what_to_do(offline, tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_checkpoint_file("facebook/detr-resnet-50")
    message = str(e.value)
    assert offline == []  # no connection tried
    assert "'facebook/detr-resnet-50' is not a local file or folder, and HF_HUB_OFFLINE=1 is set" in message
    assert f"only the Hugging Face cache ({tmp_path / 'hub-cache'}) was read" in message
    assert "hf download facebook/detr-resnet-50 config.json model.safetensors --local-dir DIR" in message
    assert "pass the path of that folder" in message


def test_hub_id_resolves_through_the_hugging_face_cache(hf, monkeypatch, offline):
    folder = hf("native").folder
    import huggingface_hub

    fetched = []

    def from_cache(repo_id, filename, revision=None, local_files_only=False, **kwargs):
        fetched.append((repo_id, filename, revision, local_files_only))
        return str(folder / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", from_cache)
    got = load_checkpoint_file("someone/detr-small@v1")
    assert fetched == [("someone/detr-small", "config.json", "v1", True),
                       ("someone/detr-small", "model.safetensors", "v1", True)]
    reference = load_checkpoint_file(folder)
    assert got["model"].keys() == reference["model"].keys()
    assert all(torch.equal(got["model"][k], v) for k, v in reference["model"].items())
    assert got["config"] == reference["config"] and got["categories"] == LABELS
    assert offline == []


# Runs in a fresh interpreter: huggingface_hub reads HF_ENDPOINT, HF_HOME and its timeouts when imported.
COUNT_CONNECTIONS = """
import socket, sys
port, attempts, connect = int(sys.argv[1]), [], socket.socket.connect

def counted(sock, address):
    if isinstance(address, tuple) and address[1] == port:
        attempts.append(address)
    return connect(sock, address)

socket.socket.connect = counted
from detr_irpe.engine.checkpoint import load_checkpoint_file
from detr_irpe.errors import CheckpointError
try:
    load_checkpoint_file("someone/detr-small")
except CheckpointError as e:
    print(len(attempts))
    print(e)
"""


@pytest.mark.parametrize("server", ["refuses connections", "never answers"])
def test_an_unreachable_hub_is_asked_once_then_only_the_cache_is_read(server, tmp_path):
    """huggingface_hub alone tries 7 connections, the last five 1, 2, 4, 8 and 8 s apart, before it reads
    the cache (23 s for refused connections); here the hub is asked once. (HF_HUB_DISABLE_TELEMETRY=1 leaves out
    a request of huggingface_hub's own: its user-agent string fetches a registry of AI agents once.)"""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    if server == "refuses connections":
        listener.close()  # nothing listens on the port any more
    else:
        listener.listen(8)  # the kernel completes connections; nobody ever accepts or answers them
    env = {"HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "0",
           "TRANSFORMERS_OFFLINE": "0", "HF_HUB_ETAG_TIMEOUT": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}
    try:
        proc = run_python(COUNT_CONNECTIONS, port, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        attempts, message = proc.stdout.split("\n", 1)
    finally:
        listener.close()
    assert int(attempts) == 1
    assert f"'someone/detr-small' is not a local file or folder, and the hub at http://127.0.0.1:{port} cannot " \
           f"be reached" in message
    assert f"only the Hugging Face cache ({tmp_path / 'hf-home' / 'hub'}) was read" in message
    assert "HF_HUB_OFFLINE=1 reads them from the cache" in message and "pass the path of that folder" in message


WITHOUT_HF_LIBRARIES = """
import json, sys
LIBRARIES = ("transformers", "timm", "huggingface_hub")
import detr_irpe.engine.checkpoint, detr_irpe.engine.convert, detr_irpe.interop
print(json.dumps([name for name in LIBRARIES if name in sys.modules]))
for name in LIBRARIES:
    sys.modules[name] = None  # from here on, as if not installed
from detr_irpe.engine.checkpoint import load_checkpoint_file
from detr_irpe.engine.convert import convert_checkpoint
from detr_irpe.optional import MissingExtraError
for attempt in (lambda: load_checkpoint_file("facebook/detr-resnet-50"),
                lambda: convert_checkpoint(sys.argv[1], sys.argv[2], "hf")):
    try:
        attempt()
        print(json.dumps("no error"))
    except MissingExtraError as e:
        print(json.dumps(str(e)))
"""


def test_without_the_hf_libraries_nothing_loads_them_and_what_needs_them_names_the_extra(tmp_path):
    our_checkpoint(tmp_path / "ours.pth")
    proc = run_python(WITHOUT_HF_LIBRARIES, tmp_path / "ours.pth", tmp_path / "hf")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    loaded, hub_id, to_hf = [json.loads(line) for line in out.splitlines()]
    assert loaded == []  # importing the checkpoint readers and writers loads none of them
    assert hub_id.startswith("the Hugging Face hub id 'facebook/detr-resnet-50' needs huggingface_hub")
    assert to_hf.startswith("writing a Hugging Face transformers folder (--to hf) needs transformers")
    assert all(message.endswith('pip install "detr_irpe[hf]"') for message in (hub_id, to_hf))
    assert not (tmp_path / "hf").exists()


# -- fine-tuning -----------------------------------------------------------------------------


def test_finetuning_an_irpe_model_from_a_transformers_folder_zeroes_the_tables(hf, tmp_path):
    folder = hf("native").folder
    cfg = load_config(None, tiny_overrides(tmp_path, **{
        "model.backbone": "resnet18", "model.dec_layers": 2, "model.enc_layers": 2, "model.num_queries": 5,
        "train.pretrained": str(folder), "data.num_workers": 0}))
    trainer = Trainer(cfg, quiet=True)
    state = trainer.model.state_dict()
    theirs = state_dict_from_checkpoint(load_checkpoint_file(folder))
    tables = [k for k in state if "lookup_table" in k]
    assert len(tables) == 2 and all(not state[k].any() for k in tables)
    assert state["class_embed.weight"].shape[0] == 92 != theirs["class_embed.weight"].shape[0]  # re-initialised
    same = [k for k in theirs if not k.startswith("class_embed.")]
    assert all(torch.equal(state[k], theirs[k]) for k in same)
