"""Which device a run uses, and what it can do: picking it, bf16 autocast where it pays, the peak FLOP/s that
MFU is measured against.

Here so that training, fine-tuning and the benchmarks choose alike. Not here: ranks and per-process devices
under torchrun (distributed.py).
"""

from __future__ import annotations

import torch


def pick_device(name: str) -> torch.device:
    """`auto` is the GPU when there is one, else the CPU; any other name is taken as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(device: torch.device, dtype: str) -> torch.autocast | None:
    """bf16 autocast on GPU; CPUs without native bf16 run it far slower, so they stay in fp32."""
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return None


# Dense bf16 peak FLOP/s per GPU, from the vendors' datasheets; MFU divides achieved model FLOP/s by these.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "H800": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
    "A10": 125e12,
    "RTX 4090": 165e12,
    "V100": 125e12,
}


def peak_flops(device: torch.device) -> float:
    """This device's peak, or 0 when unknown (CPUs): the logs then show achieved FLOP/s only."""
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_BF16_FLOPS.items() if key in name), 0.0)
