"""Human sizes for the CLI/API ("5GB", "512MiB", "2e9") and the default memory budget."""

from __future__ import annotations

import os
import re

from .errors import ConfigError

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")

# Share of available RAM used as working memory when --max-memory is not given: leaves the other half to
# the page cache that holds the memory-mapped inputs, and to the rest of the machine.
DEFAULT_MEMORY_FRACTION = 0.5
MIN_MEMORY = 64 * 2**20


def parse_size(value: str | int | float, what: str = "size") -> int:
    """Bytes from an int or a string like '5GB' (SI), '512MiB' (binary) or '2e9'."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        n = int(value)
    else:
        m = _SIZE_RE.match(str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise ConfigError(f"{what}: cannot read size {value!r} (examples: 5GB, 512MiB, 1000000)")
        n = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ConfigError(f"{what}: size must be positive, got {value!r}")
    return n


def available_memory() -> int:
    """MemAvailable from /proc/meminfo (falls back to total physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_max_memory() -> int:
    return max(MIN_MEMORY, int(available_memory() * DEFAULT_MEMORY_FRACTION))


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"
