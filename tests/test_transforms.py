"""DETR augmentations: boxes follow the pixels through flip / resize / crop; sizes; normalisation."""
import pytest
import torch
from torchvision import tv_tensors

from detr_irpe.config import DataConfig
from detr_irpe.data import (IMAGENET_MEAN, IMAGENET_STD, RandomSizeCrop, denormalize, make_eval_transforms,
                            make_train_transforms, normalize_target)

# (label, colour channel, xyxy box) of three solid rectangles on a black 120 x 90 image
RECTS = [(1, 0, (10, 10, 50, 40)), (2, 1, (60, 20, 110, 80)), (3, 2, (20, 55, 45, 85))]
H, W = 90, 120


def sample():
    image = torch.zeros(3, H, W, dtype=torch.uint8)
    for _, channel, (x0, y0, x1, y1) in RECTS:
        image[channel, y0:y1, x0:x1] = 255
    boxes = torch.tensor([r[2] for r in RECTS], dtype=torch.float32)
    target = {
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(H, W)),
        "labels": torch.tensor([r[0] for r in RECTS]),
        "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
        "iscrowd": torch.zeros(3, dtype=torch.int64),
        "image_id": torch.tensor(5),
        "orig_size": torch.tensor([H, W]),
    }
    return tv_tensors.Image(image), target


def pixel_box(channel_mask):
    """xyxy box (pixel edges) of the True pixels of an (H, W) mask."""
    ys, xs = torch.nonzero(channel_mask, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


def small_cfg(**kw):
    base = dict(train_scales=[64, 72, 80, 96], max_size=160, crop_resize=[80, 100], crop_min=40, crop_max=70,
                eval_size=96)
    return DataConfig(**{**base, **kw})


def test_train_boxes_follow_the_pixels():
    """Whatever flip / resize / crop is drawn, each box is the box of its rectangle's pixels."""
    transform = make_train_transforms(small_cfg())
    seen_sizes, removed = set(), 0
    for seed in range(60):
        torch.manual_seed(seed)
        image, target = transform(*sample())
        target = normalize_target(target, tuple(image.shape[-2:]))
        h, w = target["size"].tolist()
        seen_sizes.add((h, w))
        pixels = denormalize(image) > 0.5
        assert len(target["labels"]) == len(target["area"]) == len(target["iscrowd"]) == len(target["boxes"])
        labels = target["labels"].tolist()
        removed += 3 - len(labels)
        for label, channel, _ in RECTS:
            if label not in labels:
                assert pixels[channel].float().mean() < 0.01  # cropped away (at most resampling bleed)
                continue
            cx, cy, bw, bh = target["boxes"][labels.index(label)].tolist()
            box = torch.tensor([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h])
            assert torch.allclose(box, pixel_box(pixels[channel]), atol=1.5), (seed, label)
        assert ((target["boxes"] >= 0) & (target["boxes"] <= 1)).all()
    assert len(seen_sizes) > 3 and removed > 0  # both branches and some crop removals were exercised


def test_flip_matches_hand_computed_boxes():
    # One scale equal to the image's shortest side and no crop: only the flip changes anything.
    transform = make_train_transforms(small_cfg(train_scales=[H], crop_resize=[]))
    flipped_image = sample()[0].flip(-1)
    boxes = torch.tensor([r[2] for r in RECTS], dtype=torch.float32)
    hand_flipped = torch.stack([W - boxes[:, 2], boxes[:, 1], W - boxes[:, 0], boxes[:, 3]], dim=1)
    outcomes = set()
    for seed in range(20):
        torch.manual_seed(seed)
        image, target = transform(*sample())
        assert image.shape[-2:] == (H, W)
        was_flipped = torch.allclose(denormalize(image), flipped_image.float() / 255, atol=1e-5)
        expected = hand_flipped if was_flipped else boxes
        assert torch.equal(target["boxes"].as_subclass(torch.Tensor), expected)
        assert target["labels"].tolist() == [1, 2, 3]
        outcomes.add(was_flipped)
    assert outcomes == {True, False}


def test_no_flip_when_disabled():
    transform = make_train_transforms(small_cfg(train_scales=[H], crop_resize=[], hflip=False))
    for seed in range(10):
        torch.manual_seed(seed)
        _, target = transform(*sample())
        assert torch.equal(target["boxes"].as_subclass(torch.Tensor), sample()[1]["boxes"].as_subclass(torch.Tensor))


def test_multiscale_resize_scales_boxes():
    transform = make_train_transforms(small_cfg(train_scales=[60], crop_resize=[], hflip=False))
    image, target = transform(*sample())
    h, w = image.shape[-2:]
    assert (h, w) == (60, 80)
    scale = torch.tensor([w / W, h / H, w / W, h / H])
    assert torch.allclose(target["boxes"].as_subclass(torch.Tensor), sample()[1]["boxes"] * scale)


@pytest.mark.parametrize("hw, eval_size, max_size, expected", [
    ((480, 640), 800, 1333, (800, 1066)),
    ((640, 480), 800, 1333, (1066, 800)),
    ((100, 1000), 800, 1333, (133, 1333)),  # longest side capped
    ((128, 128), 128, 128, (128, 128)),  # small square demo config
    ((64, 96), 128, 128, (85, 128)),
])
def test_eval_sizes(hw, eval_size, max_size, expected):
    transform = make_eval_transforms(DataConfig(eval_size=eval_size, max_size=max_size))
    image = tv_tensors.Image(torch.zeros(3, *hw, dtype=torch.uint8))
    boxes = tv_tensors.BoundingBoxes(torch.tensor([[0.0, 0.0, hw[1], hw[0]]]), format="XYXY", canvas_size=hw)
    out, target = transform(image, {"boxes": boxes, "labels": torch.tensor([1])})
    assert tuple(out.shape[-2:]) == expected
    full = torch.tensor([[0.0, 0.0, expected[1], expected[0]]])
    assert torch.allclose(target["boxes"].as_subclass(torch.Tensor), full)


def test_augment_false_gives_the_eval_transform():
    cfg = small_cfg(augment=False)
    for seed in range(5):
        torch.manual_seed(seed)
        image, target = make_train_transforms(cfg)(*sample())
        assert min(image.shape[-2:]) == 96
        assert torch.allclose(target["boxes"].as_subclass(torch.Tensor), sample()[1]["boxes"] * 96 / H)


def test_normalisation():
    value = torch.tensor([0, 128, 255], dtype=torch.uint8)
    image = tv_tensors.Image(value.view(3, 1, 1).expand(3, 20, 30).clone())
    boxes = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(20, 30))
    out, _ = make_eval_transforms(DataConfig(eval_size=20))(image, {"boxes": boxes})
    expected = (value.float() / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert out.dtype == torch.float32
    assert torch.allclose(out.mean(dim=(1, 2)), expected, atol=1e-5)
    assert torch.allclose(denormalize(out), image.float() / 255, atol=1e-5)


def test_random_size_crop_bounds():
    crop = RandomSizeCrop(40, 70)
    for seed in range(30):
        torch.manual_seed(seed)
        image, target = crop(*sample())
        h, w = image.shape[-2:]
        assert 40 <= h <= 70 and 40 <= w <= 70
        assert target["boxes"].canvas_size == (h, w)
    # an image smaller than min_size is kept whole along that side
    small = tv_tensors.Image(torch.zeros(3, 30, 200, dtype=torch.uint8))
    h, w = RandomSizeCrop(40, 70)(small).shape[-2:]
    assert h == 30 and 40 <= w <= 70
    with pytest.raises(ValueError):
        RandomSizeCrop(50, 40)


def test_normalize_target_cxcywh():
    _, target = sample()
    out = normalize_target(target, (H, W))
    x0, y0, x1, y1 = RECTS[0][2]
    assert torch.allclose(out["boxes"][0], torch.tensor([(x0 + x1) / 2 / W, (y0 + y1) / 2 / H, (x1 - x0) / W,
                                                         (y1 - y0) / H]))
    assert type(out["boxes"]) is torch.Tensor and out["size"].tolist() == [H, W]


def test_bad_crop_range_names_the_config_keys():
    with pytest.raises(ValueError, match="data.crop_min"):
        make_train_transforms(small_cfg(crop_min=90, crop_max=50))
