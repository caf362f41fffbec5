"""Benchmarks: scripts that print ratios measured side by side in one run (`python -m benchmarks.X`).

Each prints the machine first (`machine_header`): results differ by CPU (AVX2 against AVX-512 VNNI,
BF16 or AMX), so figures from two machines are never compared.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

# The instruction sets that change this project's speed: int8 (VNNI, AMX-INT8) and bf16 (AVX512-BF16, AMX-BF16).
FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")


def cpu_flags(cpuinfo: str) -> tuple[str, set[str]]:
    """The CPU's model name and its flags, from /proc/cpuinfo's text."""
    model, flags = platform.processor() or platform.machine(), set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
        elif key.strip() in ("flags", "Features"):
            flags = set(value.split())
    return model, flags


def machine_header() -> str:
    """One line: the CPU, its cores and which of FEATURES it has."""
    info = Path("/proc/cpuinfo")
    model, flags = cpu_flags(info.read_text() if info.exists() else "")
    has = [f for f in FEATURES if f in flags]
    return (
        f"machine: {model}, {os.cpu_count()} cores; CPU features: {', '.join(has) or 'none of ' + ', '.join(FEATURES)}"
    )
