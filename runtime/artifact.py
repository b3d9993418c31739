"""The .kiln artifact: one zip file holding a manifest, the graph's text form, the parameters
(npz, read with allow_pickle=False) and any backend code. Written atomically; checked by
content hash when read. Members are read by fixed names and never extracted to disk."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import kiln
from kiln.errors import ArtifactError, GraphError
from kiln.ir.graph import Graph
from kiln.ir.text import parse_graph, print_graph

FORMAT = "kiln-artifact"
# 2: an int8 product's packed weights may end each panel with its column sums (the layout's
# "sums"); a kiln that reads only 1 would pack them without, under code that reads them, so it
# refuses 2. Format 1 artifacts load as they are (no sums).
FORMAT_VERSION = 2


@dataclass
class Artifact:
    graph: Graph
    target: str
    code: dict[str, bytes] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)


def _signature(graph: Graph) -> dict[str, Any]:
    def entry(v):
        return {"name": v.name, "dtype": v.type.dtype.short, "shape": list(v.type.shape)}

    return {"inputs": [entry(v) for v in graph.inputs], "outputs": [entry(v) for v in graph.outputs]}


def _content_hash(members: dict[str, bytes]) -> str:
    h = hashlib.sha256()
    for name in sorted(members):
        h.update(name.encode() + b"\0" + len(members[name]).to_bytes(8, "little") + members[name])
    return h.hexdigest()


def write_artifact(path: str | os.PathLike, artifact: Artifact) -> None:
    """Write ``artifact`` to ``path`` atomically (a temp file in the same folder, then rename)."""
    graph = artifact.graph
    names = [v.name for v in graph.params]
    buffer = io.BytesIO()
    np.savez(buffer, **{f"p{i}": np.ascontiguousarray(a) for i, a in enumerate(graph.params.values())})
    members = {"graph.txt": print_graph(graph).encode(), "params.npz": buffer.getvalue()}
    members.update({f"code/{k}": v for k, v in artifact.code.items()})
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kiln_version": kiln.__version__,
        "target": artifact.target,
        "signature": _signature(graph),
        "params": names,
        "content_sha256": _content_hash(members),
        **artifact.manifest,
    }
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    try:
        with os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("manifest.json", json.dumps(manifest, indent=2))
            for name, data in members.items():
                zf.writestr(name, data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_artifact(path: str | os.PathLike) -> Artifact:
    """Read and check an artifact; ArtifactError names the file and what is wrong."""
    source = str(path)
    try:
        zf = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise ArtifactError(f"{source}: no such file") from None
    except (zipfile.BadZipFile, OSError) as err:
        raise ArtifactError(f"{source}: not a kiln artifact ({err})") from None
    with zf:
        try:
            manifest = json.loads(zf.read("manifest.json"))
        except (KeyError, ValueError, zipfile.BadZipFile) as err:
            raise ArtifactError(f"{source}: not a kiln artifact (no readable manifest: {err})") from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise ArtifactError(f"{source}: not a kiln artifact (format {manifest.get('format')!r})")
        version = manifest.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ArtifactError(
                f"{source}: artifact format {version} is newer than this kiln ({kiln.__version__}) reads "
                f"(format {FORMAT_VERSION}); upgrade kiln or recompile"
            )
        try:
            members = {n: zf.read(n) for n in zf.namelist() if n != "manifest.json"}
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise ArtifactError(f"{source}: corrupted ({err})") from None
    if _content_hash(members) != manifest.get("content_sha256"):
        raise ArtifactError(f"{source}: corrupted: content does not match the manifest's sha256")
    try:
        with np.load(io.BytesIO(members["params.npz"]), allow_pickle=False) as npz:
            arrays = [npz[f"p{i}"] for i in range(len(manifest["params"]))]
        params = dict(zip(manifest["params"], arrays))
        graph = parse_graph(members["graph.txt"].decode(), params)
    except (KeyError, ValueError, GraphError) as err:
        raise ArtifactError(f"{source}: corrupted or incompatible graph: {err}") from None
    code = {n[len("code/") :]: data for n, data in members.items() if n.startswith("code/")}
    return Artifact(graph, manifest["target"], code, manifest)
