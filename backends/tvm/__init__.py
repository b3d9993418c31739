"""The TVM backend: ``target="tvm-cuda"`` (NVIDIA GPUs) and ``target="tvm-llvm"`` (TVM on the
CPU, the same lowering, so machines without a GPU test it).

``build`` lowers the planned graph to one Relax module (``lower.to_relax``: a PrimFunc per node
or fused group, called from one ``main``), compiles it with TVM's default pipeline for the
target (dlight's GPU rules schedule every PrimFunc on CUDA) and runs it in a Relax VM: a run is
one VM call, parameters stay on the device between runs. The artifact stores the exported
library, so ``kiln.load`` never compiles again; compiles are cached like the llvm backend's.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from kiln.backends.cache import cache_key, load_entry, store_entry
from kiln.errors import ArtifactError, KilnError
from kiln.ir.graph import Graph, Node
from kiln.passes.decompose import Decompose

DEFAULT_ARCH = "sm_90"


def _tvm():
    try:
        import tvm
    except ImportError as err:  # pragma: no cover - apache-tvm is a dependency
        raise KilnError(f"the TVM backend needs apache-tvm ({err})") from None
    return tvm


@dataclass(frozen=True)
class TVMTarget:
    """Where the code runs: ``kind`` "cuda" (with a GPU ``arch``) or "llvm" (the host CPU)."""

    kind: str
    arch: str | None = None

    @property
    def name(self) -> str:
        return f"tvm-{self.kind}"

    def tvm_target(self):
        tvm = _tvm()
        if self.kind == "cuda":
            # 48 KiB: what every CUDA GPU gives a block without opting in
            return tvm.target.Target({"kind": "cuda", "arch": self.arch, "max_shared_memory_per_block": 49152})
        return tvm.target.Target({"kind": "llvm"})

    def device(self):
        tvm = _tvm()
        if self.kind == "cuda":
            dev = tvm.cuda(0)
            if not dev.exist:
                raise KilnError("target tvm-cuda: no CUDA device is visible here (compiling works without one; running needs a GPU)")
            return dev
        return tvm.cpu(0)


def cuda_available() -> bool:
    """Whether TVM sees a CUDA device here (compiling for tvm-cuda never needs one)."""
    return bool(_tvm().cuda(0).exist)


def present_arch() -> str:
    """The arch of the GPU present (``sm_90`` for an H100), else DEFAULT_ARCH."""
    tvm = _tvm()
    dev = tvm.cuda(0)
    if dev.exist:
        return "sm_" + dev.compute_version.replace(".", "")
    return DEFAULT_ARCH


class TVMExecutable:
    """A Relax VM over the compiled library; parameters uploaded once.

    The VM starts where the target's device is: at once on the CPU or where a GPU is visible (so
    a library that does not load says so at ``kiln.load``), else at the first run, so a
    ``tvm-cuda`` build is compiled and saved on a machine without a GPU."""

    def __init__(self, graph: Graph, target: TVMTarget, library: bytes):
        self.graph = graph
        self.target = target
        self.library = library
        if target.kind != "cuda" or cuda_available():
            self._vm  # noqa: B018 - starts it

    @functools.cached_property
    def _vm(self) -> tuple:
        """(device, the VM's main, the parameters on the device)."""
        tvm = _tvm()
        from tvm import relax

        device = self.target.device()
        with tempfile.TemporaryDirectory(prefix="kiln-tvm-") as folder:
            path = os.path.join(folder, "model.so")
            with open(path, "wb") as fh:
                fh.write(self.library)
            try:
                module = tvm.runtime.load_module(path)
            except Exception as err:  # noqa: BLE001 - TVM raises its own error types
                raise ArtifactError(f"the TVM library does not load here ({str(err).splitlines()[0]})") from None
        params = [tvm.runtime.tensor(np.require(a, requirements="C"), device) for a in self.graph.params.values()]
        return device, relax.VirtualMachine(module, device)["main"], params

    @property
    def device(self):
        return self._vm[0]

    def to_device(self, array: Any):
        """A TVM tensor on this executable's device: from numpy, or from any DLPack tensor."""
        tvm = _tvm()
        if isinstance(array, tvm.runtime.Tensor) and array.device == self.device:
            return array  # already here: parameters kept on the device between runs
        if hasattr(array, "__dlpack__") and not isinstance(array, np.ndarray):
            return tvm.runtime.from_dlpack(array)
        return tvm.runtime.tensor(np.require(array, requirements="C"), self.device)

    def run_device(self, inputs: Sequence[Any]) -> list:
        """Run on device tensors (or numpy arrays); the outputs stay on the device (DLPack)."""
        _, main, params = self._vm
        result = main(*[self.to_device(a) for a in inputs], *params)
        return list(result)

    def run(self, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
        return [t.numpy() for t in self.run_device(inputs)]

    def code(self) -> dict[str, bytes]:
        meta = {"kind": self.target.kind, "arch": self.target.arch}
        return {"tvm.so": self.library, "tvm.json": json.dumps(meta).encode()}


def _has_lowering(node: Node) -> bool:
    from kiln.backends.tvm.lower import has_lowering  # imports TVM

    return has_lowering(node)


def compile_library(graph: Graph, target: TVMTarget, tune_trials: int | None = None) -> bytes:
    """The exported shared library of ``graph`` built for ``target``; with ``tune_trials``, its
    kernels tuned by MetaSchedule first (``tune.py``)."""
    from kiln.backends.tvm.lower import to_relax, unsupported_ops

    missing = unsupported_ops(graph)
    if missing:
        raise KilnError(f"target {target.name}: no TVM lowering yet for {', '.join(missing)}")
    tvm_target = target.tvm_target()
    module = legalize(to_relax(graph), tvm_target)
    if not tune_trials:
        return _build(graph, module, target)
    from kiln.backends.tvm import tune

    tune.check_requirements(target)
    with tune.database(target) as db:
        tune.tune(module, target, tune_trials, db)
        return _build(graph, module, target, db)


def legalize(module, tvm_target):
    """Relax ops (reshapes...) as PrimFuncs, each PrimFunc annotated with its pattern: the
    module that is tuned and built."""
    import tvm
    from tvm import relax

    with tvm_target:
        return tvm.transform.Sequential([relax.transform.LegalizeOps(), relax.transform.AnnotateTIROpPattern()])(module)


def _build(graph: Graph, module, target: TVMTarget, database=None) -> bytes:
    """The exported library of the legalized ``module``. On CUDA a failed build is tried once
    more with every kernel's schedule checked alone first (``gpu_schedule``), so a dlight rule
    whose schedule does not lower gives way to the next rule."""
    tvm = _tvm()
    tvm_target = target.tvm_target()
    for checked in (False, True) if target.kind == "cuda" else (False,):
        try:
            executable = tvm.compile(module, target=tvm_target, relax_pipeline=relax_pipeline(target.kind, tvm_target, database, checked))
            break
        except Exception as err:  # noqa: BLE001 - TVM's errors carry its C++ stack
            failure = _first_line(err)
    else:
        raise KilnError(f"internal error: TVM could not build {graph.name!r} for {target.name}: {failure}")
    with tempfile.TemporaryDirectory(prefix="kiln-tvm-") as folder:
        path = os.path.join(folder, "model.so")
        executable.export_library(path)
        with open(path, "rb") as fh:
            return fh.read()


def relax_pipeline(kind: str, tvm_target, database=None, checked: bool = False):
    """TVM's default Relax pipeline for the (legalized) module without its FuseOps/FuseTIR:
    kiln's passes chose the groups, each already one PrimFunc. A tuning ``database`` schedules
    the kernels it holds; on CUDA dlight's default GPU rules schedule the rest (matmul, GEMV,
    reductions, then a fallback: ``gpu_schedule``, ``checked`` as there)."""
    import tvm
    from tvm import relax

    from tvm.relax.backend.cpu_generic import pipeline as cpu
    from tvm.relax.backend.cuda import pipeline as cuda

    backend = cuda if kind == "cuda" else cpu

    @tvm.transform.module_pass(opt_level=0, name="KilnRelaxPipeline")
    def pipeline(mod, _ctx):
        with tvm_target, (database if database is not None else contextlib.nullcontext()):
            passes = []
            if database is not None:  # reads the target and the database from the context
                passes.append(relax.transform.MetaScheduleApplyDatabase(enable_warning=False))
            if kind == "cuda":
                from kiln.backends.tvm.gpu_schedule import default_schedule

                passes.append(default_schedule(tvm_target, checked))
            passes += backend.dataflow_lower_passes(tvm_target) + backend.finalize_passes(tvm_target)
            return tvm.transform.Sequential(passes)(mod)

    return pipeline


def _first_line(err: Exception) -> str:
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip() and not ln.startswith(("#", " "))]
    return lines[0] if lines else type(err).__name__


class TVMBackend:
    """``target="tvm-cuda"`` or ``"tvm-llvm"``: TE/TIR lowering built by TVM; -O2 by default."""

    default_pipeline = "O2"
    preferred_layout = "nchw"
    # recurrent ops become GEMMs and gate math, as on llvm; then ops without a lowering are
    # expressed through others
    lowering = ["decompose_rnn", Decompose(when=lambda node: not _has_lowering(node))]

    def __init__(self, kind: str, arch: str | None = None, tune: int | None = None):
        self.kind = kind
        self.arch = arch
        self.tune = tune
        self.name = f"tvm-{kind}"

    def target(self) -> TVMTarget:
        return TVMTarget(self.kind, (self.arch or present_arch()) if self.kind == "cuda" else None)

    def build(self, graph: Graph) -> TVMExecutable:
        target = self.target()
        library = self.compile(graph, target)
        return TVMExecutable(graph, target, library)

    def compile(self, graph: Graph, target: TVMTarget) -> bytes:
        """The library for ``graph`` from the cache, or built (and cached)."""
        tvm = _tvm()
        key = cache_key(graph, target.name, target.arch or "", tvm.__version__, f"tune={self.tune or 0}")
        hit = load_entry(key, ".so")
        if hit is not None:
            return hit[0]
        library = compile_library(graph, target, self.tune)
        store_entry(key, library, {"target": target.name, "arch": target.arch}, ".so")
        return library

    def load(self, artifact) -> TVMExecutable:
        try:
            library, meta = artifact.code["tvm.so"], json.loads(artifact.code["tvm.json"])
            target = TVMTarget(meta["kind"], meta["arch"])
        except (KeyError, ValueError, TypeError) as err:
            raise ArtifactError(f"a TVM artifact without its library or target ({err})") from None
        return TVMExecutable(artifact.graph, target, library)
