"""hubconf.py: official DETR's torch.hub entries and the iRPE model zoo's, loaded as a user does
(``torch.hub.load(repo, name, source="local")``)."""
import argparse
import importlib.util
import urllib.error

import pytest
import torch

from helpers import REPO, run_python
from detr_irpe.apps.hub import HUB_ENTRIES, hub_cache_path
from detr_irpe.errors import CheckpointError, UsageError
from detr_irpe.models import PostProcess, PostProcessPanoptic

R50 = 41_524_768  # DESIGN.md's contracts
IRPE_9X9 = 41_540_320
IRPE_7X7 = 41_534_176


def _r101() -> int:
    """ResNet-101 has 17 more bottlenecks in its third stage than ResNet-50: three convolutions each
    (batch norm is frozen, so buffers)."""
    return R50 + 17 * (1024 * 256 + 256 * 256 * 9 + 256 * 1024)


def _panoptic(detector: int) -> int:
    """+ 250 classes instead of 91, + official DETR's mask head (attention map q/k linears; the
    FPN-style head: 3x3 convs 264->264->128->64->32->16->1 with group norms, 1x1 adapters from
    the backbone's 1024, 512, 256 channels)."""
    head = (251 - 92) * (256 + 1)
    attention = 2 * (256 * 256 + 256)
    dims = [264, 264, 128, 64, 32, 16]
    convs = sum(a * b * 9 + b for a, b in zip(dims, dims[1:])) + 16 * 9 + 1
    norms = sum(2 * d for d in dims[1:])
    adapters = sum(c * d + d for c, d in zip((1024, 512, 256), (128, 64, 32)))
    return detector + head + attention + convs + norms + adapters


EXPECTED = {
    "detr_resnet50": R50, "detr_resnet50_dc5": R50, "detr_resnet101": _r101(), "detr_resnet101_dc5": _r101(),
    "detr_resnet50_panoptic": _panoptic(R50), "detr_resnet50_dc5_panoptic": _panoptic(R50),
    "detr_resnet101_panoptic": _panoptic(_r101()),
    "detr_resnet50_irpe_7x7": IRPE_7X7, "detr_resnet50_irpe_9x9": IRPE_9X9, "detr_resnet50_irpe_9x9_300ep": IRPE_9X9,
}


def load(name, **kwargs):
    return torch.hub.load(str(REPO), name, source="local", **kwargs)


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    """An empty torch hub cache, and no network: a download attempt fails as it does offline."""
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError(f"offline test: no network for {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    yield tmp_path / "hub"
    torch.hub.set_dir(previous)


def test_the_entries_are_official_detrs_and_the_irpe_zoos():
    spec = importlib.util.spec_from_file_location("hubconf", REPO / "hubconf.py")
    hubconf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hubconf)
    # what torch.hub.list shows: the public callables (it takes only GitHub repositories)
    listed = [name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")]
    assert sorted(listed) == sorted(EXPECTED) == sorted(HUB_ENTRIES)
    assert hubconf.dependencies == ["torch", "torchvision"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_entry_builds_with_the_reference_parameter_count(name):
    with torch.device("meta"):  # shapes only: the count does not need values
        model = load(name, pretrained=False)
    assert sum(p.numel() for p in model.parameters()) == EXPECTED[name]
    assert type(model).__name__ == ("DETRsegm" if "panoptic" in name else "DETR")


def test_num_classes_changes_the_head_and_the_postprocessor_comes_on_request():
    with torch.device("meta"):
        model, post = load("detr_resnet50_irpe_9x9", pretrained=False, num_classes=21, return_postprocessor=True)
        panoptic, panoptic_post = load("detr_resnet50_panoptic", threshold=0.5, return_postprocessor=True)
    assert model.class_embed.out_features == 22 and isinstance(post, PostProcess)
    assert isinstance(panoptic_post, PostProcessPanoptic) and panoptic_post.threshold == 0.5
    assert panoptic.detr.class_embed.out_features == 251
    assert panoptic_post.is_thing_map[90] and not panoptic_post.is_thing_map[91]


def test_weights_in_the_hub_cache_load_offline_and_strictly(hub_dir):
    reference = load("detr_resnet50_irpe_7x7", pretrained=False)
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
             for k, v in reference.state_dict().items()}
    path = hub_cache_path(HUB_ENTRIES["detr_resnet50_irpe_7x7"].url)
    path.parent.mkdir(parents=True)
    # as the iRPE release stores it: the model, and the training script's arguments
    torch.save({"model": state, "args": argparse.Namespace(enc_rpe2d="rpe-1.9-product-ctx-1-k")}, path)
    assert path.name == "rpe-1.9-product-ctx-1-k.pth" and path.parent == hub_dir / "checkpoints"

    model = load("detr_resnet50_irpe_7x7", pretrained=True)
    loaded = model.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)

    with pytest.warns(UserWarning, match="class_embed.bias, class_embed.weight start fresh"):
        tuned = load("detr_resnet50_irpe_7x7", pretrained=True, num_classes=3)
    assert tuned.class_embed.out_features == 4
    assert torch.equal(tuned.query_embed.weight, state["query_embed.weight"])

    state.pop("query_embed.weight")  # a file that does not fit: strict loading names the key
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match="query_embed.weight"):
        load("detr_resnet50_irpe_7x7", pretrained=True)


def test_pretrained_offline_names_the_url_and_the_cache_path(hub_dir):
    url = HUB_ENTRIES["detr_resnet50"].url
    with pytest.raises(CheckpointError) as raised:
        load("detr_resnet50", pretrained=True)
    message = str(raised.value)
    assert url in message and str(hub_dir / "checkpoints" / "detr-r50-e632da11.pth") in message
    assert "\n" not in message


def test_an_unknown_option_names_the_closest_field():
    with pytest.raises(UsageError, match="rpe_impl"):
        load("detr_resnet50", rpe_imp="sdpa")


def test_loading_an_entry_imports_nothing_optional():
    code = ("import sys, torch\n"
            f"m = torch.hub.load({str(REPO)!r}, 'detr_resnet50_irpe_9x9', source='local', pretrained=False)\n"
            "print(sorted(n for n in ('av', 'onnx', 'onnxruntime', 'onnxscript', 'transformers', 'timm', "
            "'tensorboard', 'huggingface_hub') if n in sys.modules))")
    out = run_python(code, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr[-3000:]
