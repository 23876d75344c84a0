"""Where inference runs: CUDA automatically when a GPU is present, CPU otherwise.

Mixed precision is a CUDA-only feature here: CPU autocast (bfloat16) is slower than float32 on
most CPUs without AMX and changes results, so it is never turned on silently.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = [
    "DeviceUnavailableError",
    "configure_cpu_threads",
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


def configure_cpu_threads(cpu_threads: int) -> int:
    """Apply `inference.cpu_threads` (0 keeps torch's default); return the count in effect."""
    if cpu_threads < 0:
        raise ValueError(f"cpu_threads must be >= 0, got {cpu_threads}")
    if cpu_threads > 0:
        torch.set_num_threads(cpu_threads)
    return torch.get_num_threads()
