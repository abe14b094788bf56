"""COCO evaluation time of each backend as a ratio to pycocotools, measured in one run, with the
numbers they give compared to pycocotools' with ==.

    python benchmarks/eval_speed.py                      # the val2017-sized set and the demo validation
    python benchmarks/eval_speed.py --images 500 --skip-demo

1. A synthetic val2017-sized set (seeded): 5,000 images of COCO's sizes, 36,413 boxes over 80
   categories (skewed frequencies, COCO's small / medium / large mix, ~1% crowd), and DETR's 100
   detections per image (500,000 results: noisy copies of the objects, some with the wrong
   category, and background boxes). For each backend: building its ground-truth index, then
   ``loadRes + evaluate + accumulate + summarize`` (the evaluation step, what every epoch pays),
   and whether all 12 stats and every per-class AP equal pycocotools' (==). faster-coco-eval is
   timed through the library directly: the project refuses it (evaluation.backends.NOT_EXACT).
2. The demo model's whole per-epoch validation: inference on the demo's validation images
   (``engine.evaluate.predict_dataset``, timed once), then the evaluation of its detections with
   each exact backend (``CocoEvaluator``, as ``engine.evaluate.evaluate`` runs it).
"""
import argparse
import gc
import time

import numpy as np
import torch

from detr_irpe.evaluation.backends import BACKENDS, NOT_EXACT, load_ground_truth, run_cocoeval, summary_table
from detr_irpe.evaluation.coco_eval import METRIC_NAMES, per_class_ap
from machine import describe

# val2017: 5,000 images, 36,781 annotations of which 368 crowd, 80 categories
IMAGES, BOXES, CATEGORIES, CROWD = 5000, 36413, 80, 0.01


def synthetic_val2017(images: int = IMAGES, boxes: int = BOXES, categories: int = CATEGORIES,
                      detections: int = 100, seed: int = 0):
    """``(annotations dict, results list)``: a seeded val2017-sized set and DETR-like detections."""
    rng = np.random.default_rng(seed)
    widths = rng.choice([640, 640, 640, 500, 480, 427], images)
    heights = rng.choice([480, 480, 427, 640, 375, 640], images)
    image_list = [{"id": i + 1, "width": int(w), "height": int(h), "file_name": f"{i + 1:012d}.jpg"}
                  for i, (w, h) in enumerate(zip(widths, heights))]
    cat_ids = np.arange(1, categories + 1) + (np.arange(categories) // 10)  # gaps, like COCO's ids
    frequency = rng.permutation(1.0 / np.arange(1, categories + 1))  # person-like head, long tail
    frequency /= frequency.sum()
    owner = np.sort(rng.integers(0, images, boxes))  # ~7.3 objects per image, some images without any
    # COCO's size mix: ~41% small, 34% medium, 25% large (side in pixels, log-uniform per class)
    kind = rng.choice(3, boxes, p=[0.41, 0.34, 0.25])
    lo, hi = np.array([4.0, 32.0, 96.0])[kind], np.array([32.0, 96.0, 400.0])[kind]
    side = np.exp(rng.uniform(np.log(lo), np.log(hi)))
    aspect = np.exp(rng.normal(0, 0.5, boxes))
    w = np.minimum(side * np.sqrt(aspect), widths[owner] - 1.0)
    h = np.minimum(side / np.sqrt(aspect), heights[owner] - 1.0)
    x = rng.uniform(0, widths[owner] - w)
    y = rng.uniform(0, heights[owner] - h)
    cats = cat_ids[rng.choice(categories, boxes, p=frequency)]
    crowd = rng.random(boxes) < CROWD
    anns = [{"id": j + 1, "image_id": int(owner[j] + 1), "category_id": int(cats[j]),
             "bbox": [round(float(x[j]), 2), round(float(y[j]), 2), round(float(w[j]), 2), round(float(h[j]), 2)],
             "area": round(float(w[j] * h[j]) * 0.7, 2), "iscrowd": int(crowd[j])} for j in range(boxes)]
    gt = {"images": image_list, "annotations": anns,
          "categories": [{"id": int(c), "name": f"class_{k:02d}"} for k, c in enumerate(cat_ids)]}

    # detections: per image, one noisy copy of each object (a quarter with another category), the
    # rest background boxes; scores higher for the copies
    results = []
    starts = np.searchsorted(owner, np.arange(images + 1))
    for i in range(images):
        objects = np.arange(starts[i], starts[i + 1])[:detections]
        n_bg = detections - len(objects)
        jitter = rng.normal(0, 0.08, (len(objects), 4)) * np.stack([w[objects], h[objects]] * 2, 1)
        box = np.stack([x[objects], y[objects], w[objects], h[objects]], 1) + jitter
        box[:, 2:] = np.maximum(box[:, 2:], 1.0)
        label = np.where(rng.random(len(objects)) < 0.25, cat_ids[rng.integers(0, categories, len(objects))],
                         cats[objects])
        score = rng.beta(5, 2, len(objects))
        bw, bh = rng.uniform(2, widths[i] / 2, n_bg), rng.uniform(2, heights[i] / 2, n_bg)
        bg = np.stack([rng.uniform(0, widths[i] - bw), rng.uniform(0, heights[i] - bh), bw, bh], 1)
        box = np.concatenate([box, bg]).astype(np.float32)  # DETR's boxes are float32
        label = np.concatenate([label, cat_ids[rng.choice(categories, n_bg, p=frequency)]])
        score = np.concatenate([score, rng.beta(1, 8, n_bg)]).astype(np.float32)
        for b, c, s in zip(box.tolist(), label.tolist(), score.tolist()):
            results.append({"image_id": i + 1, "category_id": int(c), "bbox": b, "score": s})
    return gt, results


def time_backend(backend, gt: dict, results: list, image_ids: list, names: dict):
    """``(seconds to index the ground truth, seconds of the evaluation step, stats, per-class AP)``."""
    gc.collect()
    start = time.perf_counter()
    coco_gt = load_ground_truth(backend, gt)
    indexed = time.perf_counter()
    coco_eval = run_cocoeval(backend, coco_gt, results, "bbox", image_ids)
    summary_table(coco_eval)
    done = time.perf_counter()
    return indexed - start, done - indexed, [float(v) for v in coco_eval.stats], per_class_ap(coco_eval, names)


def eval_set(args) -> dict:
    """``{backend: (index seconds, step seconds, stats, per-class AP)}`` of the synthetic set."""
    start = time.perf_counter()
    gt, results = synthetic_val2017(args.images, round(BOXES * args.images / IMAGES), seed=args.seed)
    print(f"synthetic set: {len(gt['images'])} images, {len(gt['annotations'])} boxes "
          f"({sum(a['iscrowd'] for a in gt['annotations'])} crowd), {len(gt['categories'])} categories, "
          f"{len(results)} detections (made in {time.perf_counter() - start:.1f} s)")
    image_ids = sorted(img["id"] for img in gt["images"])
    names = {c["id"]: c["name"] for c in gt["categories"]}
    rows = {}
    for repeat in range(args.repeats):
        for name in ("pycocotools", "ultrafast", "faster-coco-eval"):
            backend = BACKENDS[name]
            if not backend.installed:
                continue
            index_s, step_s, stats, per_class = time_backend(backend, gt, results, image_ids, names)
            best = rows.get(name)
            rows[name] = (min(index_s, best[0]) if best else index_s, min(step_s, best[1]) if best else step_s,
                          stats, per_class)
    ref = rows["pycocotools"]
    print(f"\nbbox evaluation of {len(results)} detections (best of {args.repeats}):")
    print(f"{'backend':<18} {'index GT':>9} {'loadRes+evaluate+accumulate+summarize':>38} {'speed-up':>9}  "
          f"stats == pycocotools   per-class AP ==   used by the project")
    for name, (index_s, step_s, stats, per_class) in rows.items():
        same_stats = stats == ref[2]
        diff = max(abs(a - b) for a, b in zip(stats, ref[2]))
        same_pc = per_class == ref[3]
        used = f"refused: {NOT_EXACT[name][:40]}..." if name in NOT_EXACT else "yes"
        print(f"{name:<18} {index_s:>8.2f}s {step_s:>37.2f}s {ref[1] / step_s:>8.1f}x  "
              f"{str(same_stats) + ('' if same_stats else f' (max |diff| {diff:.1e})'):<22} {str(same_pc):<17} {used}")
    print("AP (pycocotools):", ", ".join(f"{n} {v:.4f}" for n, v in zip(METRIC_NAMES, ref[2])))
    return rows


def demo_validation(args) -> None:
    from detr_irpe.apps.demo import DemoSettings, build_demo_config
    from detr_irpe.data import build_dataset, ensure_synthetic_dataset
    from detr_irpe.engine.evaluate import predict_dataset
    from detr_irpe.evaluation import CocoEvaluator
    from detr_irpe.models import build_detr

    settings = DemoSettings()
    layout = ensure_synthetic_dataset(args.demo_root, settings.num_train, settings.num_val, settings.image_size,
                                      settings.data_seed, max_objects=settings.max_objects)
    cfg = build_demo_config(settings, layout)
    torch.manual_seed(0)
    model, _, postprocessor = build_detr(cfg.model)
    dataset = build_dataset(cfg.data, "val")
    start = time.perf_counter()
    detections = predict_dataset(model, postprocessor, dataset, torch.device("cpu"), cfg.train.batch_size, quiet=True)
    inference = time.perf_counter() - start
    count = sum(len(d["scores"]) for d in detections.values())
    print(f"\ndemo model's per-epoch validation: {len(dataset)} images, {count} detections (untrained weights); "
          f"inference {inference:.2f}s, then the evaluation (best of {args.repeats}):")
    times = {}
    for _ in range(args.repeats):
        for name in ("pycocotools", "ultrafast"):
            if BACKENDS[name].installed:
                start = time.perf_counter()
                evaluator = CocoEvaluator(dataset.coco, backend=name)
                evaluator.update(detections)
                evaluator.summarize(verbose=False)
                times[name] = min(times.get(name, float("inf")), time.perf_counter() - start)
    for name, seconds in times.items():
        whole = inference + seconds
        print(f"{name:<12} evaluation {seconds:6.2f}s ({times['pycocotools'] / seconds:5.1f}x)   whole validation "
              f"{whole:6.2f}s ({inference + times['pycocotools']:.2f} / {whole:.2f} = "
              f"{(inference + times['pycocotools']) / whole:.2f}x)")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=IMAGES, help="images of the synthetic set (boxes scale with it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each backend (the best is reported)")
    p.add_argument("--skip-demo", action="store_true", help="only the synthetic val2017-sized set")
    p.add_argument("--skip-set", action="store_true", help="only the demo model's validation")
    p.add_argument("--demo-root", default="data/synthetic", help="the demo's generated data (made if missing)")
    args = p.parse_args(argv)
    print(describe())
    for name, backend in BACKENDS.items():
        print(f"  {name}: {backend.version if backend.installed else 'not installed'}")
    rows = eval_set(args) if not args.skip_set else {}
    if not args.skip_demo:
        demo_validation(args)
    return rows


if __name__ == "__main__":
    main()
