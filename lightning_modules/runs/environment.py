"""What a run's numbers depend on besides its config and seed, recorded beside both (``environment.json``).

A seed reproduces a run bit for bit only with the same packages, the same CPU instruction set and the same thread
count: measured here, 12 steps of the classifier differ by up to 1e-2 in a weight between AVX-512 and AVX2 kernels,
and by 5e-7 between 1 and 2 threads (README, Reproducibility). ``PINS`` are the variables that fix the first two
across machines; `make demo` sets them.
"""

from __future__ import annotations

import os
import platform

import diffusers
import lightning as L
import torch

#: environment variables that choose CPU kernels and threads; read by torch, oneDNN and MKL when they load
PINS = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "OMP_NUM_THREADS")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | None = None) -> dict:
    device = device or torch.device("cpu")
    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "lightning": L.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "pins": {name: os.environ.get(name) for name in PINS},
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
