"""The compile cache: compiled code keyed by a SHA-256 of everything that changes it.

Entries live under the user cache dir (``$XDG_CACHE_HOME/kiln``, or ``KILN_CACHE_DIR``), made
0700. Each entry is ``<key><ext>`` (object code ``.o``, a TVM library ``.so``) plus
``<key>.json`` (the backend's layout and the code's SHA-256),
written to temporary files and renamed. A read checks the hash and the key first: a corrupted,
truncated or foreign entry is ignored with a warning and rebuilt, never executed.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import kiln
from kiln import config
from kiln.fileio import write_atomic
from kiln.ir.graph import Graph
from kiln.ir.text import print_graph

FORMAT = 1


def cache_dir() -> Path | None:
    """The cache folder (created 0700), or None when caching is off (``KILN_CACHE_DIR=off``)."""
    configured = config.flags().cache_dir
    if configured == "off":
        return None
    if configured:
        folder = Path(configured)
    else:
        import platformdirs  # only where no KILN_CACHE_DIR is set

        folder = Path(platformdirs.user_cache_dir("kiln"))
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder


def cache_key(graph: Graph, *parts: str) -> str:
    """SHA-256 of the graph (its text form hashes every parameter), kiln's version and the
    backend's ``parts`` (target, features, its compiler's version, options)."""
    h = hashlib.sha256()
    for part in (print_graph(graph), kiln.__version__, str(FORMAT), *parts):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def load_entry(key: str, ext: str = ".o") -> tuple[bytes, dict] | None:
    folder = cache_dir()
    if folder is None:
        return None
    obj_path, meta_path = folder / f"{key}{ext}", folder / f"{key}.json"
    if not obj_path.exists() or not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        obj = obj_path.read_bytes()
        if meta.get("key") != key or hashlib.sha256(obj).hexdigest() != meta.get("object_sha256"):
            raise ValueError("hash mismatch")
        return obj, meta["layout"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        warnings.warn(f"kiln cache entry {obj_path.name} is corrupted or foreign ({err}); rebuilding it", stacklevel=3)
        return None


def store_entry(key: str, obj: bytes, layout: dict, ext: str = ".o") -> None:
    folder = cache_dir()
    if folder is None:
        return
    meta = {"key": key, "object_sha256": hashlib.sha256(obj).hexdigest(), "layout": layout}
    write_atomic(folder / f"{key}{ext}", obj)
    write_atomic(folder / f"{key}.json", json.dumps(meta).encode())
