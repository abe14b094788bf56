"""What the demo's fixed schedule costs, as a ratio to the recipe it replaced, measured in one run.

    python benchmarks/demo_cost.py                    # 40 timed iterations of each, after warm-up
    python benchmarks/demo_cost.py --iterations 100

t0 is the per-iteration time of the previous demo recipe (``BASELINE`` below: batch 8, images
decoded again every time, one group of queries), data loading included. The budget of the new
schedule is 4500 t0 of wall time for backbone pretraining and DETR training together. Both
recipes' iterations (and the pretraining iterations) are timed in alternation on the same data,
so that a load change on the machine hits both; the script prints the times, the schedule's
predicted wall time and its ratio to the budget.
"""
import argparse
import statistics
import time

import torch

from detr_irpe.apps.demo import DemoSettings, build_demo_config
from detr_irpe.data import build_dataloader, build_dataset, ensure_synthetic_dataset, set_epoch
from detr_irpe.engine.pretrain import ImageLabelClassifier, image_labels
from detr_irpe.engine.step import to_device, train_step
from detr_irpe.engine.optim import build_optimizer
from detr_irpe.models import build_backbone, build_detr
from machine import describe

BUDGET_ITERATIONS = 4500  # of t0
# The demo recipe before the fixed schedule (what t0 measures), as overrides of configs/demo.yaml.
BASELINE = ["train.batch_size=8", "data.cache_images=false", "model.query_groups=1", "data.num_workers=0",
            "train.lr=2e-4", "train.lr_backbone=2e-4"]


class Timer:
    """Seconds of each training iteration of one recipe, data loading included."""

    def __init__(self, cfg, seed: int):
        self.cfg = cfg
        self.model, self.criterion, _ = build_detr(cfg.model)
        self.model.train()
        self.optimizer = build_optimizer(self.model, cfg.train)
        self.loader = build_dataloader(build_dataset(cfg.data, "train"), cfg.train.batch_size, train=True,
                                       num_workers=cfg.data.num_workers, seed=seed)
        self.epoch, self.batches = 0, iter(())

    def _next(self):
        try:
            return next(self.batches)
        except StopIteration:
            set_epoch(self.loader, self.epoch)
            self.epoch += 1
            self.batches = iter(self.loader)
            return next(self.batches)

    def step(self) -> float:
        start = time.perf_counter()
        batch = to_device(*self._next(), "cpu")
        train_step(self.model, self.criterion, self.optimizer, batch, clip_max_norm=self.cfg.train.clip_max_norm)
        return time.perf_counter() - start


class PretrainTimer(Timer):
    """Seconds of each backbone pretraining iteration (the demo's ``train.pretrain_*``)."""

    def __init__(self, cfg, seed: int):
        t = cfg.train
        self.cfg = cfg
        train_set = build_dataset(cfg.data, "train")
        self.num_classes = cfg.model.num_classes
        self.model = ImageLabelClassifier(build_backbone("tiny"), self.num_classes).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=t.pretrain_lr)
        self.loader = build_dataloader(train_set, t.pretrain_batch_size, train=True,
                                       num_workers=cfg.data.num_workers, seed=seed)
        self.epoch, self.batches = 0, iter(())

    def step(self) -> float:
        start = time.perf_counter()
        images, masks, targets = self._next()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            self.model(images, masks), image_labels(targets, self.num_classes))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=40, help="timed iterations of each (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("overrides", nargs="*", help="key=value overrides of the new recipe")
    args = parser.parse_args(argv)

    settings = DemoSettings(overrides=list(args.overrides))
    layout = ensure_synthetic_dataset(settings.data_root, settings.num_train, settings.num_val, settings.image_size,
                                      settings.data_seed, max_objects=settings.max_objects)
    recipe = build_demo_config(settings, layout)
    baseline = build_demo_config(DemoSettings(overrides=list(args.overrides) + BASELINE), layout)
    torch.manual_seed(0)
    timers = {"t0 (previous recipe)": Timer(baseline, 1), "recipe, training": Timer(recipe, 1),
              "recipe, pretraining": PretrainTimer(recipe, 2)}
    times = {name: [] for name in timers}
    for i in range(args.warmup + args.iterations):
        for name, timer in timers.items():
            t = timer.step()
            if i >= args.warmup:
                times[name].append(t)
    med = {name: statistics.median(v) for name, v in times.items()}
    t0 = med["t0 (previous recipe)"]
    t = recipe.train
    train_iterations = t.epochs * (settings.num_train // t.batch_size)
    predicted = t.pretrain_iterations * med["recipe, pretraining"] + train_iterations * med["recipe, training"]
    budget = BUDGET_ITERATIONS * t0
    print(f"# {describe()}")
    print(f"# median of {args.iterations} iterations after {args.warmup} warm-up, timed in alternation")
    for name, value in med.items():
        print(f"{name:24s} {1000 * value:7.1f} ms / iteration  ({value / t0:.2f} t0)")
    print(f"schedule: {t.pretrain_iterations} pretraining + {train_iterations} training iterations "
          f"= {predicted / 60:.1f} min predicted; budget {BUDGET_ITERATIONS} t0 = {budget / 60:.1f} min; "
          f"ratio {predicted / budget:.2f}")
    return {"t0": t0, **med, "predicted": predicted, "budget": budget}


if __name__ == "__main__":
    main()
