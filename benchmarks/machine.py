"""What every benchmark prints about the machine: CPU model, AVX-512 or not, the instruction set
the compiled iRPE kernel was built for, threads, torch, the load average."""
import os
import platform

import torch

from detr_irpe.irpe import native


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        return False


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def describe() -> str:
    """One line: ``AMD EPYC (AVX-512), kernel built for avx512, 2 CPUs, 2 threads, torch 2.14.1, ...``."""
    return (f"{cpu_model()} ({'AVX-512' if has_avx512() else 'no AVX-512'}), iRPE kernel built for "
            f"{native.instruction_set()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}, Python {platform.python_version()}, load average {load_average()}")
