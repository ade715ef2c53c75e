"""Which device a run uses, and what it can do: picking it, bf16 autocast where it pays, the peak FLOP/s that
MFU is measured against.

Here so that training, fine-tuning and the benchmarks choose alike. Not here: ranks and per-process devices
under torchrun (distributed.py).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from nomoat.files import atomic_file


def pick_device(name: str) -> torch.device:
    """`auto` is the GPU when there is one, else the CPU; any other name is taken as torch spells it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(device: torch.device, dtype: str) -> torch.autocast | None:
    """bf16 autocast for `bfloat16`, and for `auto` on a GPU (training resolves a CPU's `auto` first, with
    choose_precision; elsewhere a CPU's `auto` stays fp32)."""
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


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's /proc/cpuinfo fields, read once per process (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_flags() -> set[str]:
    """The CPU's feature flags (x86 `flags`, Arm `Features`), empty where /proc/cpuinfo is not there."""
    info = _cpuinfo()
    return set((info.get("flags") or info.get("Features") or "").split())


def cpu_description() -> str:
    """CPU model and the features that decide matrix speed, to print next to every published figure."""
    import platform

    name = _cpuinfo().get("model name") or platform.processor() or platform.machine()
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "bf16", "asimd", "sve")
    flags = " ".join(f for f in wanted if f in cpu_flags()) or "no AVX2/AVX-512/AMX"
    return f"{name}, {torch.get_num_threads()} threads, {flags}"


def native_bf16(flags: set[str]) -> bool:
    """Whether the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX on x86, BF16 on Arm); without it
    oneDNN emulates bf16 and autocast only slows training down."""
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def _cache_file() -> Path:
    """Where measured verdicts are kept: $NOMOAT_CACHE, else $XDG_CACHE_HOME/nomoat (as scripts/llamacpp.sh)."""
    root = os.environ.get("NOMOAT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "nomoat"
    return Path(root) / "precision.json"


def choose_precision(device: torch.device, dtype: str, shape: str, probe: Callable[[bool], float]) -> tuple[str, str]:
    """(float32 or bfloat16, why) for train.dtype. `auto` is bf16 on a GPU; on a CPU it is bf16 only where a
    probe of this run's shape measured bf16 autocast at least 10% faster. probe(bf16) returns seconds per
    step. The verdict is cached per CPU, thread count, torch version and shape, so a given machine always
    resolves a given run alike (a second probe could land on the other side of a close call)."""
    if dtype != "auto":
        return dtype, "set by train.dtype"
    if device.type == "cuda":
        return "bfloat16", "auto: bf16 autocast on a GPU"
    if device.type != "cpu":
        return "float32", f"auto: fp32 on {device.type}"
    if not native_bf16(cpu_flags()):
        return "float32", "auto: this CPU has no native bf16 (no AVX512-BF16, AMX or Arm BF16)"
    key = f"{cpu_description()} | torch {torch.__version__} | {shape}"
    cache = _cache_file()
    known = _read_json(cache)
    if key not in known:
        fp32, bf16 = probe(False), probe(True)
        chosen = "bfloat16" if bf16 < 0.9 * fp32 else "float32"
        known[key] = {"dtype": chosen, "fp32_s": fp32, "bf16_s": bf16}
        with atomic_file(cache) as tmp:
            tmp.write_text(json.dumps(known, indent=1))
    v = known[key]
    speed = v["fp32_s"] / v["bf16_s"]
    return v["dtype"], f"auto: bf16 autocast measured {speed:.2f}x the speed of fp32 on this CPU for this shape"


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
