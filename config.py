"""kiln's flags, read in one place and overridable in a ``with`` block.

| flag                | default    | meaning                                                  |
| ------------------- | ---------- | -------------------------------------------------------- |
| KILN_DEBUG          | 0          | 1: the CLI prints full tracebacks                        |
| KILN_VERIFY         | 0          | 1: verify the graph after every pass                     |
| KILN_MAX_ELEMENTS   | 2**31      | largest tensor (in elements) a graph may describe        |
| KILN_FOLD_ELEMENTS  | 65536      | largest constant the importer folds at compile time      |
| KILN_CACHE_DIR      | (XDG)      | compile cache folder; "off" disables the cache           |
| KILN_NUM_THREADS    | (cores)    | threads compiled code splits large GEMMs over            |
| KILN_CHECK_BOUNDS   | 0          | 1: compiled code checks guard bytes after every kernel   |
| KILN_PROFILE        | 0          | 1: compiled code counts the time of every kernel         |
| KILN_FLUSH_DENORMALS| 1          | 1: llvm code runs with denormal floats flushed to zero   |
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, fields, replace
from typing import Iterator


@dataclass(frozen=True)
class Flags:
    debug: bool = False
    verify: bool = False
    max_elements: int = 2**31
    fold_elements: int = 65536
    cache_dir: str = ""  # "" = $XDG_CACHE_HOME/kiln; "off" = no cache
    num_threads: int = 0  # 0 = the cores this process may run on
    check_bounds: bool = False
    profile: bool = False
    flush_denormals: bool = True


def _from_environment() -> Flags:
    env = os.environ

    def flag(name: str, default: int) -> int:
        raw = env.get(name)
        if raw is None or raw == "":
            return default
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"environment variable {name}={raw!r} is not an integer") from None

    return Flags(
        debug=bool(flag("KILN_DEBUG", 0)),
        verify=bool(flag("KILN_VERIFY", 0)),
        max_elements=flag("KILN_MAX_ELEMENTS", 2**31),
        fold_elements=flag("KILN_FOLD_ELEMENTS", 65536),
        cache_dir=env.get("KILN_CACHE_DIR", ""),
        num_threads=flag("KILN_NUM_THREADS", 0),
        check_bounds=bool(flag("KILN_CHECK_BOUNDS", 0)),
        profile=bool(flag("KILN_PROFILE", 0)),
        flush_denormals=bool(flag("KILN_FLUSH_DENORMALS", 1)),
    )


def num_threads() -> int:
    """KILN_NUM_THREADS, or the cores this process may run on (at most 64)."""
    wanted = flags().num_threads
    if wanted < 0:
        raise ValueError(f"KILN_NUM_THREADS={wanted} must be >= 0 (0: every core)")
    if wanted == 0:
        wanted = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(wanted, 64))


_overrides: list[Flags] = []


def flags() -> Flags:
    """The flags in force: the innermost ``override`` block, else the environment (read now)."""
    return _overrides[-1] if _overrides else _from_environment()


@contextlib.contextmanager
def override(**changes: object) -> Iterator[Flags]:
    """Run a block with some flags changed: ``with override(max_elements=1000): ...``."""
    known = {f.name for f in fields(Flags)}
    unknown = set(changes) - known
    if unknown:
        raise TypeError(f"unknown kiln flag(s): {sorted(unknown)}")
    new = replace(flags(), **changes)
    _overrides.append(new)
    try:
        yield new
    finally:
        _overrides.pop()
