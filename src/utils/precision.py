"""Pick the fastest numeric precision the hardware runs natively, for frozen-backbone feature extraction."""

from __future__ import annotations

import functools
from pathlib import Path

import torch


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bfloat16 in hardware (AVX512-BF16 or AMX) and oneDNN can use it.

    Without those instructions bf16 is emulated and slower than fp32, so it is not worth choosing.
    """
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
    except (AttributeError, RuntimeError):
        return False
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():  # not Linux: trust oneDNN's answer
        return True
    flags = set()
    for line in cpuinfo.read_text().splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool({"avx512_bf16", "amx_bf16"} & flags)


@functools.cache
def fastest_precision() -> str:
    """Lightning precision string: bf16-mixed on bf16-capable GPUs and CPUs, 16-mixed on older GPUs, else 32."""
    if torch.cuda.is_available():
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_native_bf16() else "32"
