"""Where inference runs: CUDA automatically when a GPU is present, CPU otherwise.

Mixed precision at inference is a CUDA-only feature here (float16 autocast). Training may use
bfloat16 autocast on CPUs with native bfloat16 instructions (AVX512-BF16 or AMX), where it
measured 1.5-1.9x faster per step (tests/benchmarks/bench_training_step.py); on other CPUs
bfloat16 is emulated and slower, so `cpu_supports_bfloat16` decides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

__all__ = [
    "DeviceUnavailableError",
    "configure_cpu_threads",
    "cpu_supports_bfloat16",
    "select_device",
    "use_mixed_precision",
]

DeviceSetting = Literal["auto", "cpu", "cuda"]


class DeviceUnavailableError(RuntimeError):
    """The configured device cannot be used on this machine."""


def select_device(setting: DeviceSetting | str = "auto") -> torch.device:
    """Resolve the `inference.device` setting to a torch device.

    ``auto`` picks ``cuda`` when torch sees a GPU, else ``cpu``; ``cuda`` on a machine without
    one is an error rather than a silent (and much slower) fallback.
    """
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cpu":
        return torch.device("cpu")
    if setting == "cuda":
        if not torch.cuda.is_available():
            raise DeviceUnavailableError(
                "inference.device is 'cuda' but torch sees no CUDA GPU "
                f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); "
                "set inference.device to 'auto' or 'cpu', or check the driver"
            )
        return torch.device("cuda")
    raise DeviceUnavailableError(f"unknown inference.device {setting!r}; use auto, cpu or cuda")


def use_mixed_precision(device: torch.device, requested: bool) -> bool:
    """Whether to run the network under float16 autocast: only when asked for and on CUDA."""
    return bool(requested) and device.type == "cuda"


def cpu_supports_bfloat16() -> bool:
    """Whether this CPU has native bfloat16 arithmetic (AVX512-BF16 or AMX-BF16)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:  # not Linux: ask torch's dispatcher instead
        return torch.backends.cpu.get_cpu_capability() == "AVX512"
    return "avx512_bf16" in flags or "amx_bf16" in flags


def configure_cpu_threads(cpu_threads: int) -> int:
    """Apply `inference.cpu_threads` (0 keeps torch's default); return the count in effect."""
    if cpu_threads < 0:
        raise ValueError(f"cpu_threads must be >= 0, got {cpu_threads}")
    if cpu_threads > 0:
        torch.set_num_threads(cpu_threads)
    return torch.get_num_threads()
