"""Pictures: boxes beside the ground truth, attention maps, iRPE tables, training curves; their CLIs."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detr_irpe.data import ensure_synthetic_dataset
from detr_irpe.irpe import bucket_ids_2d
from detr_irpe.visualize import draw_detections, side_by_side  # the import other modules rely on
from detr_irpe.visualize.attention import (attention_picture, attention_to_image, decoder_attention_panels,
                                           encoder_attention_panel, pixel_to_cell)
from detr_irpe.visualize.boxes import TITLE_HEIGHT
from detr_irpe.visualize.curves import cut_short, run_names, series, training_curves_figure
from detr_irpe.visualize.forward import ForwardResult
from detr_irpe.visualize.rpe_tables import NoRPEError, capture_token, plot_rpe_tables, table_views
from helpers import COCO, CTX, TINY, save_tiny_checkpoint, tiny_model, tool

GAP = 8  # side_by_side's default gap


def coco_sizes():
    """(height, width) of the val images in id order (the order of ``--val N``)."""
    images = json.loads((COCO / "annotations" / "instances_val2017.json").read_text())["images"]
    return [(im["height"], im["width"]) for im in sorted(images, key=lambda im: im["id"])]


def png_size(path):
    """(height, width) of a PNG that exists, is non-empty and decodes."""
    path = Path(path)
    assert path.is_file() and path.stat().st_size > 0, path
    with Image.open(path) as im:
        im.load()
        assert im.mode in ("RGB", "RGBA")
        return im.height, im.width


def pixels(path):
    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1)


@pytest.fixture(scope="module")
def ctx_checkpoint(tiny_checkpoint):
    return tiny_checkpoint


# -- boxes ------------------------------------------------------------------------------------


def test_boxes_val_prediction_beside_ground_truth(ctx_checkpoint, tmp_path):
    tool("visualize").main(["boxes", "--checkpoint", str(ctx_checkpoint), "--val", "2", "--threshold", "0",
                            "--out", str(tmp_path)])
    written = sorted(tmp_path.glob("*_boxes.png"))
    assert len(written) == 2
    for path, (h, w) in zip(written, coco_sizes()[:2]):
        assert png_size(path) == (TITLE_HEIGHT + h, 2 * w + GAP)
        picture = pixels(path)
        prediction, truth = picture[:, TITLE_HEIGHT:, :w], picture[:, TITLE_HEIGHT:, w + GAP:]
        assert not torch.equal(prediction, truth)  # different boxes on the two panels
        assert (picture[:, :TITLE_HEIGHT] < 128).any()  # a title was written


def test_boxes_on_files_without_ground_truth(ctx_checkpoint, tmp_path):
    image = sorted((COCO / "val2017").iterdir())[0]
    tool("visualize").main(["boxes", "--checkpoint", str(ctx_checkpoint), str(image), "--threshold", "0",
                            "--out", str(tmp_path)])
    with Image.open(image) as im:
        h, w = im.height, im.width
    assert png_size(tmp_path / f"{image.stem}_boxes.png") == (TITLE_HEIGHT + h, w)


def test_small_images_are_enlarged_for_display(ctx_checkpoint, tmp_path):
    layout = ensure_synthetic_dataset(tmp_path / "shapes", num_train=8, num_val=4, image_size=64)
    tool("visualize").main(["boxes", "--checkpoint", str(ctx_checkpoint), "--val", "1", "--min-size", "128",
                            "--threshold", "0", "--out", str(tmp_path / "out"), *layout.config_overrides()])
    (path,) = (tmp_path / "out").glob("*_boxes.png")
    assert png_size(path) == (TITLE_HEIGHT + 128, 2 * 128 + GAP)


def test_draw_detections_and_side_by_side():
    image = torch.zeros(3, 40, 60, dtype=torch.uint8)
    drawn = draw_detections(image, torch.tensor([[5.0, 5, 30, 30]]), torch.tensor([1]), torch.tensor([0.9]),
                            {1: "cat"})
    assert drawn.shape == image.shape and drawn.any()
    assert side_by_side([image, drawn], gap=4).shape == (3, 40, 124)


# -- attention --------------------------------------------------------------------------------


def test_attention_cli_panels_have_the_image_size(ctx_checkpoint, tmp_path):
    h, w = coco_sizes()[0]
    tool("visualize").main(["attention", "--checkpoint", str(ctx_checkpoint), "--val", "1", "--pixel", "100", "50",
                            "--threshold", "0", "--max-objects", "2", "--layer", "all", "--out", str(tmp_path)])
    (path,) = tmp_path.glob("*_attention.png")
    assert png_size(path) == (TITLE_HEIGHT + h, 3 * w + 2 * GAP)  # encoder + 2 detections
    picture = pixels(path)[:, TITLE_HEIGHT:]
    original = pixels(sorted((COCO / "val2017").iterdir())[0])
    for i in range(3):
        panel = picture[:, :, i * (w + GAP): i * (w + GAP) + w]
        assert (panel.float() - original.float()).abs().mean() > 10  # a heatmap is blended in


def test_many_detections_wrap_into_rows_no_wider_than_the_limit():
    """Eight 640-pixel panels (the encoder's, then seven detections best first) would be 5,176
    pixels wide in one row; three fit in 2,000 pixels: rows of 3, 3 and 2, each panel where its
    place in the order puts it."""
    H, W, grid, n = 48, 640, (3, 40), 7
    generator = torch.Generator().manual_seed(0)
    cells = grid[0] * grid[1]
    scores = torch.tensor([0.75, 0.9, 0.8, 0.95, 0.72, 0.85, 0.99, 0.1])  # 7 of 8 queries score >= 0.7
    boxes = torch.tensor([[10.0 + 80 * q, 5.0, 60.0 + 80 * q, 40.0] for q in range(8)])
    result = ForwardResult(
        image=torch.randint(0, 256, (3, H, W), dtype=torch.uint8, generator=generator), input_hw=(H, W),
        padded_hw=(H, W), feature_hw=grid, scores=scores, labels=torch.arange(8) % 3 + 1, boxes=boxes,
        attention={"encoder": [torch.rand(cells, cells, generator=generator).softmax(-1)],
                   "decoder": [torch.rand(8, cells, generator=generator).softmax(-1)]})
    picture = attention_picture(result, (320, 24), max_objects=n)
    expected = [encoder_attention_panel(result, (320, 24))[0]]
    expected += [p for p, _ in decoder_attention_panels(result, result.detections(0.7, n))]
    assert len(expected) == 1 + n
    assert picture.shape == (3, 3 * (TITLE_HEIGHT + H) + 2 * GAP, 3 * W + 2 * GAP) and picture.shape[2] <= 2000
    for i, panel in enumerate(expected):
        row, col = divmod(i, 3)
        y, x = row * (TITLE_HEIGHT + H + GAP) + TITLE_HEIGHT, col * (W + GAP)
        assert torch.equal(picture[:, y: y + H, x: x + W], panel), f"panel {i} (row {row}, column {col})"
    assert (picture[:, 2 * (TITLE_HEIGHT + H + GAP):, 2 * (W + GAP):] == 255).all()  # the last row has two


def test_attention_is_cropped_to_the_valid_region():
    # a 2x3 feature grid over a 64x96 padded input whose image is the left 64x64 (column 2 is padding)
    weights = torch.zeros(2, 3)
    weights[:, 2] = 1.0  # all attention on padding cells
    heat = attention_to_image(weights.flatten(), (2, 3), (64, 64), (64, 96), (128, 128), "nearest")
    assert heat.shape == (128, 128) and heat.abs().max() == 0
    weights = torch.zeros(2, 3)
    weights[1, 1] = 1.0  # the bottom-right quarter of the image
    heat = attention_to_image(weights.flatten(), (2, 3), (64, 64), (64, 96), (128, 128), "nearest")
    assert heat[64:, 64:].min() == 1 and heat[:64].max() == 0 and heat[:, :64].max() == 0


def test_pixel_to_cell():
    # a 128x128 image resized to 64x64, padded to 64x96, on a 2x3 grid
    args = ((128, 128), (64, 64), (64, 96), (2, 3))
    assert pixel_to_cell((0, 0), *args) == (0, 0)
    assert pixel_to_cell((127, 127), *args) == (1, 1)
    assert pixel_to_cell((127, 0), *args) == (0, 1)
    with pytest.raises(ValueError, match="outside the image"):
        pixel_to_cell((128, 0), *args)


# -- iRPE tables ------------------------------------------------------------------------------


def test_rpe_cli_tables_and_query_contribution(ctx_checkpoint, tmp_path):
    tool("visualize").main(["rpe", "--checkpoint", str(ctx_checkpoint), "--val", "1", "--pixel", "100", "50",
                            "--out", str(tmp_path)])
    h, w = png_size(tmp_path / "rpe_tables.png")
    assert h > 100 and w > 100
    (query,) = tmp_path.glob("rpe_query_*.png")
    h, w = png_size(query)
    assert h > 100 and w > 200  # one column per head


def test_product_grid_places_each_offset_at_its_row_and_column():
    model = tiny_model("rpe-2.0-product-bias-0-k")  # a bias per head
    table = model.transformer.encoder.layers[0].self_attn.rpe_k
    ids, _ = bucket_ids_2d("product", 5, 5, 2.0)
    i, j = 3 * 5 + 1, 2 * 5 + 3  # p_i - p_j = (row 3 - 2, col 1 - 3) = (1, -2)
    with torch.no_grad():
        table.lookup_table_bias.zero_()
        table.lookup_table_bias[1, ids[i, j]] = 7.0
    (view,) = table_views(model)
    assert view.quantity == "bias" and view.values.shape == (TINY["nheads"], 81)
    grid = view.values[1].reshape(9, 9)
    assert grid[1 + 4, -2 + 4] == 7.0 and grid.sum() == 7.0  # centre (4, 4) is offset 0


def test_query_contribution_is_q_dot_r():
    model = tiny_model(CTX)
    batch = torch.randn(1, 3, 96, 96)
    mask = torch.zeros(1, 96, 96, dtype=torch.bool)
    tokens = capture_token(model, batch, mask, token=4)
    (view,) = table_views(model, tokens=tokens)
    weight = model.transformer.encoder.layers[0].self_attn.rpe_k.lookup_table_weight  # (1, D, 81)
    expected = tokens[0]["q"] @ weight[0]  # (heads, 81)
    assert view.quantity == "q·r" and torch.allclose(torch.from_numpy(view.values), expected.detach(), atol=1e-6)


@pytest.mark.parametrize("rpe", ["rpe-2.0-product-bias-0-k", "rpe-1.5-cross-ctx-1-qkv", "rpe-2.0-euc-bias-0-qk",
                                 "rpe-2.0-quant-ctx-0-kv"])
def test_rpe_table_plots_for_every_method_and_mode(rpe, tmp_path):
    model = tiny_model(rpe, enc_layers=2)
    out = plot_rpe_tables(model, tmp_path / "tables.png")
    h, w = png_size(out)
    assert h > 100 and w > 100
    views = table_views(model, layers=[-1])
    assert {v.layer for v in views} == {1}


def fails_with(capsys, message, name, argv):
    """``tools/<name>.py argv`` exits 1 with one ``error:`` line holding ``message``, no traceback."""
    assert tool(name).main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err, err


def test_rpe_without_irpe_is_a_clear_error(tmp_path, capsys):
    checkpoint = save_tiny_checkpoint(tmp_path / "plain.pth", rpe=None)
    with pytest.raises(NoRPEError, match="no iRPE"):
        table_views(tiny_model(None))
    fails_with(capsys, "no iRPE", "visualize", ["rpe", "--checkpoint", str(checkpoint), "--out", str(tmp_path)])
    assert not (tmp_path / "rpe_tables.png").exists()


# -- training curves --------------------------------------------------------------------------


def write_log(path, epochs, loss0, with_val_every=2, torn=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for e in range(epochs):
        r = {"epoch": e, "train_loss": loss0 / (e + 1), "train_loss_ce": 1.0 / (e + 1), "train_loss_bbox": 0.5 / (e + 1),
             "train_loss_giou": 0.8 / (e + 1), "train_class_error": 90.0 - 10 * e, "train_cardinality_error": 3.0}
        if e % with_val_every == with_val_every - 1:
            r.update(val_AP=0.01 * e, val_AP50=0.03 * e)
        lines.append(json.dumps(r))
    text = "\n".join(lines) + "\n" + ('{"epoch": 9, "train_lo' if torn else "")
    path.write_text(text)
    return path


def test_plot_logs_compares_runs(tmp_path):
    a = write_log(tmp_path / "run_a" / "log.jsonl", 5, 12.0)
    b = write_log(tmp_path / "run_b" / "log.jsonl", 3, 10.0, with_val_every=1, torn=True)
    out = tmp_path / "curves.png"
    tool("plot_logs").main([str(a), str(b), "--out", str(out)])
    h, w = png_size(out)
    assert h > 300 and w > 600
    tool("visualize").main(["curves", str(a), str(b), "--out", str(tmp_path / "again.png")])
    assert png_size(tmp_path / "again.png") == (h, w)
    assert run_names([a, b]) == ["run_a", "run_b"]


def test_series_keeps_the_last_record_of_a_repeated_epoch():
    records = [{"epoch": 0, "train_loss": 3.0}, {"epoch": 1, "train_loss": 2.0}, {"epoch": 1, "train_loss": 1.5},
               {"epoch": 2, "val_AP": 0.1}, {"epoch": 2, "train_loss": float("nan")}]
    assert series(records, "train_loss") == ([0.0, 1.0], [3.0, 1.5])
    assert series(records, "val_AP") == ([2.0], [0.1])


def cut_short_log():
    """Six full epochs of 400 iterations, the loss falling 0.1 per epoch, then a time budget that
    stops epoch 6 after one iteration, whose batch happened to be easy: its average is that one loss."""
    records = [{"epoch": e, "train_loss": 7.5 - 0.1 * e, "train_iterations": 400} for e in range(6)]
    records[5].update(val_AP=0.2)
    records.append({"epoch": 6, "train_loss": 5.0, "train_iterations": 1, "out_of_time": True, "val_AP": 0.21})
    return records


def test_an_epoch_cut_short_is_a_marker_of_its_own_not_a_spike_of_the_line():
    fig = training_curves_figure({"run": cut_short_log()})
    loss = next(ax for ax in fig.axes if ax.get_title() == "total loss")
    joined = [line for line in loss.lines if line.get_linestyle() != "None"]
    assert len(joined) == 1 and list(joined[0].get_xdata()) == [0, 1, 2, 3, 4, 5]  # epoch 6 is not joined
    assert max(abs(a - b) for a, b in zip(joined[0].get_ydata(), joined[0].get_ydata()[1:])) < 0.11  # no spike
    (alone,) = [line for line in loss.lines if line.get_linestyle() == "None"]
    assert list(alone.get_xdata()) == [6] and list(alone.get_ydata()) == [5.0]  # drawn where it was logged
    assert alone.get_markerfacecolor() == "white"  # hollow, and the legend says what that means
    assert "epoch cut short (fewer iterations)" in [t.get_text() for t in loss.get_legend().get_texts()]
    assert [t.get_text() for t in loss.texts] == ["1/400 it."]
    ap = next(ax for ax in fig.axes if ax.get_title() == "AP / AP50")  # the evaluation covers the whole val set
    assert [list(line.get_xdata()) for line in ap.lines] == [[5, 6]]


def test_which_epochs_count_as_cut_short():
    full = [{"epoch": e, "train_loss": 1.0, "train_iterations": 50} for e in range(3)]
    assert cut_short(full) == {}
    assert cut_short(full + [{"epoch": 3, "train_iterations": 20}]) == {3.0: (20, 50)}  # max_iters_per_epoch lowered
    assert cut_short(full + [{"epoch": 3, "out_of_time": True}]) == {3.0: (None, 50)}
    capped = [{"epoch": e, "train_iterations": 5} for e in range(3)]  # every epoch capped alike: none is short
    assert cut_short(capped) == {}


def test_cli_errors_are_messages(ctx_checkpoint, tmp_path, capsys):
    fails_with(capsys, "nothing to draw", "visualize", ["boxes", "--checkpoint", str(ctx_checkpoint),
                                                        "--out", str(tmp_path)])
    fails_with(capsys, "outside the image", "visualize", ["attention", "--checkpoint", str(ctx_checkpoint), "--val",
                                                          "1", "--pixel", "100000", "5", "--out", str(tmp_path)])
    fails_with(capsys, "no such log file", "plot_logs", [str(tmp_path / "missing" / "log.jsonl"),
                                                         "--out", str(tmp_path / "c.png")])
