"""Process-group setup for torchrun (DDP): NCCL on GPUs, gloo on CPU; no-ops in a single process."""
from __future__ import annotations

import os
from typing import Dict

import torch
import torch.distributed as dist

from ..config import ConfigError


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def pick_device(device: str = "auto", option: str = "--device") -> str:
    """``device`` checked against this machine: ``auto`` (CUDA if available, else CPU), ``cpu``,
    ``cuda`` or ``cuda:N``. ``option`` is how the user set it (``--device``, ``train.device``), named
    in the error when no such GPU is visible."""
    device = str(device).strip()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    valid = device == "cpu" or device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())
    if not valid:
        raise ConfigError(f"{option} {device!r} is not a device: use auto, cpu, cuda or cuda:N")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{option} {device}: no CUDA GPU is visible on this machine "
                              f"(torch.cuda.is_available() is False); use {option} cpu, or auto")
        index = int(device[5:]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise ConfigError(f"{option} {device}: this machine has {torch.cuda.device_count()} visible GPU(s), "
                              f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def init_distributed(device: str = "auto", option: str = "train.device") -> torch.device:
    """Join the process group that torchrun describes in the environment and pick this rank's device.

    ``device``: see :func:`pick_device` (``option`` names the setting in its errors). Under
    torchrun each process takes ``cuda:LOCAL_RANK``. Returns the device to use.
    """
    device = pick_device(device, option)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not is_distributed():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.startswith("cuda"):
            torch.cuda.set_device(local_rank)
            device = f"cuda:{local_rank}"
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return torch.device(device)


def cleanup_distributed() -> None:
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def any_process(flag: bool, device) -> bool:
    """True on every process if ``flag`` is True on any (so that all ranks stop at the same iteration)."""
    if not is_distributed():
        return flag
    value = torch.tensor([float(flag)], device=device)
    dist.all_reduce(value)
    return bool(value.item() > 0)


@torch.no_grad()
def reduce_dict(values: Dict[str, torch.Tensor], average: bool = True) -> Dict[str, torch.Tensor]:
    """All-reduce a dict of scalar tensors (for logging); averaged over processes by default."""
    world = get_world_size()
    if world == 1 or not values:
        return values
    names = sorted(values)
    stacked = torch.stack([values[k].detach().float() for k in names])
    dist.all_reduce(stacked)
    if average:
        stacked /= world
    return dict(zip(names, stacked))


def on_main_process(check, *args, **kwargs):
    """``check(*args, **kwargs)`` on the main process, its result on every process; an error it
    raises is raised on every process (so that no rank waits forever for one that stopped)."""
    if not is_distributed():
        return check(*args, **kwargs)
    outcome = (None, None)
    if is_main_process():
        try:
            outcome = (check(*args, **kwargs), None)
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            outcome = (None, e)
    result, error = broadcast_object(outcome)
    if error is not None:
        raise error
    return result


def broadcast_object(obj):
    """Rank 0's ``obj`` on every process."""
    if not is_distributed():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


@torch.no_grad()
def sync_buffers(module: torch.nn.Module) -> None:
    """Copy rank 0's buffers (e.g. BatchNorm running statistics) to every process.

    DDP broadcasts buffers at the start of each training forward, so after the last step each
    rank holds the statistics of its own last batch; evaluating (or saving) without this sync
    would use different models on different ranks.
    """
    if is_distributed():
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)
