"""One image reader everywhere (detr_irpe/data/images.py): every PIL mode gives the same model input in
eval and in predict, 16-bit and alpha map as documented, and EXIF orientation follows the documented
rule (user images as photo viewers show them; datasets by their json's size)."""
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.transforms.v2.functional import to_dtype

from detr_irpe.config import DataConfig
from detr_irpe.data import CocoDetection
from detr_irpe.data.check import check_dataset
from detr_irpe.data.images import dataset_orientation, pil_to_rgb, read_rgb
from detr_irpe.data.transforms import make_eval_transforms, model_input_transform
from helpers import tool

CFG = DataConfig(eval_size=24, max_size=40)
W, H = 24, 16  # stored size of the EXIF test images: not square, multiples of the JPEG block
RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (9, 12, 3), dtype=np.uint8)
ALPHA = RNG.integers(0, 256, (9, 12), dtype=np.uint8)
SIXTEEN = RNG.integers(0, 65536, (9, 12)).astype(np.uint16)
LOW_SIXTEEN = RNG.integers(0, 1000, (9, 12)).astype(np.uint16)  # e.g. 10-bit sensor data
# what photo viewers do to the stored pixels (H, W, C) for each EXIF orientation (the TIFF/EXIF spec)
VIEWER = {
    2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
    5: lambda a: a.transpose(1, 0, 2), 6: lambda a: np.rot90(a, -1), 7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


def save_mode(path, mode):
    """One small image file of each kind a user may have."""
    rgb = Image.fromarray(RGB)
    files = {
        "sixteen": lambda: Image.fromarray(SIXTEEN).save(path),
        "low_sixteen": lambda: Image.fromarray(LOW_SIXTEEN).save(path),
        "rgba": lambda: Image.fromarray(np.dstack([RGB, ALPHA])).save(path),
        "la": lambda: Image.fromarray(np.dstack([RGB[..., 0], ALPHA])).save(path),
        "palette": lambda: rgb.convert("P").save(path),
        "palette_transparent": lambda: rgb.convert("P").save(path, transparency=0),
        "cmyk": lambda: rgb.convert("CMYK").save(path, quality=95),
        "gray": lambda: Image.fromarray(RGB[..., 0]).save(path),
        "bilevel": lambda: Image.fromarray(ALPHA > 127).save(path),
    }
    files[mode]()
    return path


def one_image_json(folder, file_name, width, height):
    """A COCO json listing one image (with one box) in ``folder``."""
    path = folder / f"{file_name}.json"
    path.write_text(json.dumps({
        "images": [{"id": 1, "file_name": file_name, "width": width, "height": height}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4], "area": 16, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "thing"}]}))
    return path


def stored_pixels(path):
    """The file's pixels as stored, EXIF ignored: ``(H, W, 3)`` uint8."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def save_tagged_jpeg(path, orientation, size=(W, H)):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(RNG.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, exif=exif, quality=95)
    return path


def chw(array):
    return torch.from_numpy(np.array(array)).permute(2, 0, 1)


@pytest.mark.parametrize("mode", ["sixteen", "low_sixteen", "rgba", "la", "palette", "palette_transparent", "cmyk",
                                  "gray", "bilevel"])
def test_eval_and_predict_give_bitwise_equal_model_inputs(tmp_path, mode):
    suffix = ".jpg" if mode == "cmyk" else ".png"
    path = save_mode(tmp_path / f"{mode}{suffix}", mode)
    with Image.open(path) as im:
        width, height = im.size
    dataset = CocoDetection(tmp_path, one_image_json(tmp_path, path.name, width, height), make_eval_transforms(CFG))
    eval_input, _ = dataset[0]
    predict_input = model_input_transform(CFG)(read_rgb(path))
    assert eval_input.shape == (3, 24, 32) and torch.equal(eval_input, predict_input)
    assert torch.equal(dataset.load_image(0).as_subclass(torch.Tensor), read_rgb(path))


def test_sixteen_bit_images_map_by_their_value_range_as_torchvision_does(tmp_path):
    for values in (SIXTEEN, LOW_SIXTEEN):
        Image.fromarray(values).save(tmp_path / "sixteen.png")
        image = read_rgb(tmp_path / "sixteen.png")
        expected = np.floor(values.astype(np.float64) / 256).astype(np.uint8)
        assert torch.equal(image, chw(np.repeat(expected[..., None], 3, axis=2)))
        assert torch.equal(image[0], to_dtype(torch.from_numpy(values.astype(np.int32)).to(torch.uint16),
                                              torch.uint8, scale=True))
    assert image.max() <= 3  # low values stay dark: no per-image stretch


def test_rgba_is_composited_on_white(tmp_path):
    save_mode(tmp_path / "rgba.png", "rgba")
    alpha = ALPHA[..., None] / 255.0
    expected = np.rint(RGB * alpha + 255 * (1 - alpha)).astype(np.uint8)
    assert torch.equal(read_rgb(tmp_path / "rgba.png"), chw(expected))


def test_int_and_float_modes_follow_the_documented_mapping():
    def gray(array):
        return pil_to_rgb(Image.fromarray(array), exif=False)[0, 0].tolist()

    assert gray(np.array([[0, 300, 65535]], np.int32)) == [0, 1, 255]  # I within 0..65535: 16-bit
    assert gray(np.array([[-100, 0, 100]], np.int32)) == [0, 127, 255]  # other I: min..max stretched
    assert gray(np.array([[0, 0.5, 1]], np.float32)) == [0, 128, 255]  # F within [0, 1]: times 255, rounded
    assert gray(np.array([[-1, 0, 3]], np.float32)) == [0, 63, 255]
    big_endian = Image.frombytes("I;16B", (3, 1), np.array([0, 511, 65535], ">u2").tobytes())
    assert pil_to_rgb(big_endian, exif=False)[:, 0].T.tolist() == [[0] * 3, [1] * 3, [255] * 3]
    for mode in ("YCbCr", "PA", "RGB"):
        image = pil_to_rgb(Image.fromarray(RGB).convert(mode), exif=False)
        assert image.dtype == torch.uint8 and image.shape == (3, 9, 12), mode


@pytest.mark.parametrize("orientation", range(2, 9))
def test_read_rgb_shows_a_tagged_photo_as_viewers_do(tmp_path, orientation):
    path = save_tagged_jpeg(tmp_path / "photo.jpg", orientation)
    image = read_rgb(path)
    assert torch.equal(image, chw(VIEWER[orientation](stored_pixels(path))))
    with Image.open(path) as im:
        assert torch.equal(image, chw(np.asarray(ImageOps.exif_transpose(im).convert("RGB"))))


@pytest.mark.parametrize("orientation, stored, json_wh, applied", [
    *[(o, (W, H), json_wh, False) for o in (1, 2, 3, 4) for json_wh in [(W, H), (H, W), None]],
    *[(o, (W, W), (W, W), False) for o in (5, 6, 7, 8)],
    *[(o, (W, H), (H, W), True) for o in (5, 6, 7, 8)],
    *[(o, (W, H), json_wh, False) for o in (5, 6, 7, 8) for json_wh in [(W, H), None, (None, None), (H, H)]],
])
def test_dataset_images_turn_only_when_the_json_gives_the_turned_size(orientation, stored, json_wh, applied):
    assert dataset_orientation(orientation, stored, json_wh) is applied


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_a_dataset_reads_the_stored_pixels_when_the_json_gives_the_stored_size(tmp_path, orientation):
    path = save_tagged_jpeg(tmp_path / "photo.jpg", orientation)
    dataset = CocoDetection(tmp_path, one_image_json(tmp_path, path.name, W, H))
    assert torch.equal(dataset[0][0], chw(stored_pixels(path)))


@pytest.mark.parametrize("orientation", [6, 8])
def test_a_dataset_turns_a_sideways_photo_when_the_json_gives_the_turned_size(tmp_path, orientation):
    path = save_tagged_jpeg(tmp_path / "photo.jpg", orientation)
    dataset = CocoDetection(tmp_path, one_image_json(tmp_path, path.name, H, W))
    image, target = dataset[0]
    assert torch.equal(image, chw(VIEWER[orientation](stored_pixels(path))))
    assert target["size"].tolist() == [W, H]


def test_check_data_lists_every_tagged_image_and_how_its_boxes_are_read(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    tags = {"a.jpg": (3, (W, H)), "b.jpg": (6, (W, H)), "c.jpg": (8, (H, W)), "d.jpg": (2, (W, H)),
            "e.jpg": (6, (H, W)), "plain.jpg": (1, (W, H))}
    for name, (orientation, _) in tags.items():
        save_tagged_jpeg(folder / name, orientation)
    images = [{"id": i, "file_name": name, "width": wh[0], "height": wh[1]}
              for i, (name, (_, wh)) in enumerate(tags.items(), 1)]
    annotations = tmp_path / "annotations.json"
    annotations.write_text(json.dumps({"images": images, "annotations": [],
                                       "categories": [{"id": 1, "name": "thing"}]}))
    code = tool("check_data").main(["--annotations", str(annotations), "--images", str(folder), "--examples", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "5 image files with an EXIF orientation tag" in out and "size differs" not in out
    stored = "boxes read on the stored pixels"
    turned = "the json gives the rotated size: loaded rotated, as viewers show it"
    for line in (f"a.jpg (image 1): viewers show it rotated 180°; {stored}",
                 f"b.jpg (image 2): viewers show it rotated 90° clockwise; {stored}",
                 f"c.jpg (image 3): viewers show it rotated 90° counter-clockwise; {turned}",
                 f"d.jpg (image 4): viewers show it mirrored left-right; {stored}",
                 f"e.jpg (image 5): viewers show it rotated 90° clockwise; {turned}"):
        assert line in out
    assert "plain.jpg" not in out
    assert "re-save it upright without the tag (PIL.ImageOps.exif_transpose)" in out
    assert "exif_orientation" not in check_dataset(annotations, folder, decode=False).findings  # existence only


def test_predict_draws_tagged_photos_upright(tiny_checkpoint, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    half_turn, quarter_turn = save_tagged_jpeg(photos / "half.jpg", 3), save_tagged_jpeg(photos / "quarter.jpg", 6)
    out = tmp_path / "pred"
    assert tool("predict").main(["--checkpoint", str(tiny_checkpoint), str(photos), "--out", str(out),
                                 "--threshold", "2"]) == 0  # no box drawn: the PNG is the image as read
    with Image.open(out / "half.png") as im:
        assert np.array_equal(np.asarray(im.convert("RGB")), VIEWER[3](stored_pixels(half_turn)))
    with Image.open(out / "quarter.png") as im:
        assert im.size == (H, W)  # width and height swapped against the stored file
        assert np.array_equal(np.asarray(im.convert("RGB")), VIEWER[6](stored_pixels(quarter_turn)))
