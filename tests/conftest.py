"""Fixtures shared by the test files (helpers without fixtures are in helpers.py)."""
import os
from pathlib import Path

import pytest
import torch

from helpers import save_tiny_checkpoint


def pytest_configure(config):
    # Subprocesses (CLIs, interpreter runs, torchrun) import this checkout, installed or not.
    repo = str(Path(__file__).resolve().parents[1])
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH")) if p)
    if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: one thread each
        torch.set_num_threads(1)


# Files whose module fixtures or subprocesses take many seconds, slowest first. They run before the
# rest, so that `make test`'s two workers (xdist, --dist loadfile: a file stays on one worker) end
# together rather than one waiting on a heavy file that came last in the alphabet.
HEAVY_FIRST = ("test_export.py", "test_irpe_triton.py", "test_segmentation_apps.py", "test_interop_hf.py",
               "test_irpe_fastpaths.py", "test_engine_cli.py", "test_install.py", "test_irpe_native.py",
               "test_accumulate_ddp.py", "test_visualize.py", "test_segmentation.py")


def pytest_collection_modifyitems(items):
    order = {name: rank for rank, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: order.get(item.path.name, len(HEAVY_FIRST)))  # stable: the rest keep their order


@pytest.fixture(scope="session", autouse=True)
def irpe_kernel():
    """The compiled iRPE kernel, built (or loaded from the cache) once before any test uses it."""
    from detr_irpe.irpe import native

    return native.load()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A checkpoint of the tiny DETR-iRPE (random tables), its config pointing at tests/data's val images."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny.pth")
