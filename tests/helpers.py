"""What the tests share: the tiny model every test builds, a checkpoint of it, the real COCO images
in tests/data, and running the tools in-process or as a user does. Fixtures are in conftest.py."""
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
COCO = REPO / "tests" / "data" / "coco"
VAL_DATA = {"root": str(COCO), "val_images": "val2017", "val_annotations": "annotations/instances_val2017.json"}
# The model of the unit tests: a tiny backbone, d_model 32, one encoder and two decoder layers.
TINY = dict(backbone="tiny", backbone_weights="none", hidden_dim=32, nheads=4, enc_layers=1, dec_layers=2,
            dim_feedforward=64, num_queries=5, num_classes=4)
CTX = "rpe-2.0-product-ctx-1-k"


def randomize_tables(module, generator=None):
    """Random iRPE lookup tables (they start at zero, which would hide a wrong mapping)."""
    generator = generator if generator is not None else torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lookup_table" in name:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype))


def tiny_model(rpe=CTX, seed=0, **overrides):
    """The tiny DETR (iRPE tables random), in eval mode."""
    from detr_irpe.models import build_detr

    torch.manual_seed(seed)
    model = build_detr(**{**TINY, "rpe": rpe, **overrides})[0].eval()
    randomize_tables(model, torch.Generator().manual_seed(seed))
    return model


def save_tiny_checkpoint(path, rpe=CTX, categories=None, model=None, model_options=None, **data):
    """Our checkpoint format (model, config, class names) of the tiny model, its config pointing
    at the COCO val images of tests/data (``model_options`` override the model config, ``data``
    the data config)."""
    from detr_irpe.config import Config, DataConfig, ModelConfig

    model_options = model_options or {}
    model = model if model is not None else tiny_model(rpe, **model_options)
    cfg = Config(model=ModelConfig(**{**TINY, "rpe": rpe, **model_options}),
                 data=DataConfig(**{**VAL_DATA, "eval_size": 128, "max_size": 192, **data}))
    torch.save({"model": model.state_dict(), "config": cfg.to_dict(),
                "categories": categories or {1: "person", 2: "bicycle", 3: "car"}}, path)
    return path


def load_benchmark(name):
    """``benchmarks/<name>.py`` as a module (its ``main(argv)`` runs in this process)."""
    folder = REPO / "benchmarks"
    sys.path.insert(0, str(folder))  # the scripts import their neighbours (machine.py)
    try:
        spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(folder))


def tool(name):
    """``tools/<name>.py`` as a module: its ``main(argv)`` runs in this process, returns the exit code."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def tiny_overrides(output_dir, **extra) -> list:
    """key=value overrides for a model that trains a few iterations in seconds on CPU."""
    values = {
        "data.root": str(COCO),
        "data.train_scales": "[96, 128]", "data.max_size": 160, "data.eval_size": 128,
        "data.crop_resize": "[96]", "data.crop_min": 64, "data.crop_max": 96, "data.num_workers": 0,
        "model.backbone": "tiny", "model.backbone_weights": "none", "model.hidden_dim": 32, "model.nheads": 2,
        "model.enc_layers": 1, "model.dec_layers": 2, "model.dim_feedforward": 64, "model.num_queries": 6,
        "model.rpe": "rpe-2.0-product-ctx-1-k", "model.num_classes": 91,
        "train.output_dir": str(output_dir), "train.epochs": 2, "train.batch_size": 2, "train.lr": 1e-3,
        "train.lr_drop": 1, "train.log_every": 1, "train.seed": 7, "train.deterministic": "true",
        "eval.pictures": "false",  # drawn and checked in test_eval_pictures.py and test_engine_cli.py
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def run_tool(script: str, *args, timeout: int = 300, extra_env=None) -> subprocess.CompletedProcess:
    """Run ``tools/<script>`` (or a module via ``-m``) the way a user does; fails with its output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **(extra_env or {}))
    cmd = [sys.executable] + (list(script) if isinstance(script, (list, tuple)) else [str(REPO / "tools" / script)])
    proc = subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def _gloo_worker(rank: int, world: int, check, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.save(check(rank), Path(out_dir) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


# Imported once in the fork server; each child process of the tests is a fork of it (a fresh
# interpreter spends seconds importing them). The server never runs a torch op, so no thread pool is
# copied half-way through its work; none of detr_irpe is imported there, nor any optional library, so
# a child imports the package as a fresh interpreter would.
PRELOAD = ["torch", "torchvision"]


def process_context():
    """The multiprocessing context for the tests' child processes: ``forkserver``, preloaded. (The
    server keeps the environment it started with: pass a child what it needs as arguments.)"""
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def _run_python(code: str, argv: list, cwd: str, env: dict, stdout: str, stderr: str) -> None:
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, stdout), (2, stderr)):  # the files, for Python's writes and C's alike
        file = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(file, fd)
        os.close(file)
    sys.argv = ["-c", *argv]
    exec(compile(code, "<string>", "exec"), {"__name__": "__main__"})  # SystemExit(n): exit code n


def run_python(code: str, *args, cwd=REPO, env=None, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -c code args...`` in a new process (a fork of the preloaded server, see PRELOAD), with
    ``env`` added to the environment; its exit code, stdout and stderr (an exception: code 1, the
    traceback on stderr)."""
    with tempfile.TemporaryDirectory() as folder:
        out, err = Path(folder) / "stdout", Path(folder) / "stderr"
        process = process_context().Process(target=_run_python, args=(code, [str(a) for a in args], str(cwd),
                                                                      dict(env or {}), str(out), str(err)))
        process.start()
        process.join(timeout)
        if process.is_alive():
            process.kill()
            process.join()
            raise TimeoutError(f"python -c ... {args} ran past {timeout} s:\n{err.read_text()[-3000:]}")
        return subprocess.CompletedProcess(["python", "-c", "...", *args], process.exitcode, out.read_text(),
                                           err.read_text())


def spawn_gloo(check, out_dir: Path, world: int = 2) -> list:
    """``[check(0), check(1), ...]``, each computed in its own process of one gloo process group
    (``check``: a module-level function of the rank, returning what ``torch.save`` can write)."""
    process_context()
    mp.start_processes(_gloo_worker, args=(world, check, str(out_dir / "init"), str(out_dir)), nprocs=world,
                       join=True, start_method="forkserver")
    return [torch.load(out_dir / f"{rank}.pt", weights_only=False) for rank in range(world)]


class LargestTensor(TorchDispatchMode):
    """Inside ``with LargestTensor() as probe``: the largest tensor any torch op made, in elements
    (``probe.largest``) and in bytes (``probe.largest_bytes``; triton's interpreter copies its
    arguments as bytes)."""

    def __init__(self):
        super().__init__()
        self.largest = self.largest_bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                self.largest_bytes = max(self.largest_bytes, t.numel() * t.element_size())
        return out
