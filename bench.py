"""Benchmarks: one model compiled for kiln's target, timed side by side with its peers.

Every runtime runs the same seeded inputs; each one's outputs are checked against kiln eager
(the oracle) before its times count. Figures are medians and 90th percentiles over ``repeat``
runs after ``warmup`` runs (and at least WARMUP_SECONDS of warm-up), taken in one process,
one runtime after another.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import onnx

from kiln import config
from kiln.driver import compile as kiln_compile
from kiln.driver import resolve_model
from kiln.errors import KilnError

RTOL, ATOL = 1e-3, 1e-4


@dataclass
class BenchRow:
    runtime: str
    setup_s: float
    median_ms: float
    p90_ms: float
    throughput: float  # samples per second (first input's leading dim per run)
    speedup_vs_eager: float
    max_abs_err: float
    max_rel_err: float
    matches_eager: bool
    arena_bytes: int | None = None
    profile: list | None = None  # NodeTime per node of kiln's compiled target, with profile=True


def random_inputs(input_types: Mapping, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, t in input_types.items():
        dtype = t.dtype.numpy
        if dtype.kind == "f":
            feeds[name] = rng.standard_normal(t.shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[name] = rng.random(t.shape) < 0.5
        else:
            feeds[name] = rng.integers(0, 10, size=t.shape).astype(dtype)
    return feeds


WARMUP_SECONDS = 0.3  # the least warm-up time, whatever ``warmup`` says


def _time(run: Callable[[], object], warmup: int, repeat: int, tick: Callable[[], None]) -> list[float]:
    """``repeat`` timed runs after ``warmup`` runs and at least WARMUP_SECONDS of them: the
    runtime timed before (numpy's BLAS, onnxruntime's pool) leaves threads spinning for a
    while after its last call, which halved a small model's speed on two cores (MLP 0.24 ->
    0.49 ms when its compile came from the cache and so started at once)."""
    start = time.perf_counter()
    done = 0
    while done < warmup or time.perf_counter() - start < WARMUP_SECONDS:
        run()
        if done < warmup:
            tick()
        done += 1
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
        tick()
    return times


def _errors(got: Mapping[str, np.ndarray], want: Mapping[str, np.ndarray]) -> tuple[float, float, bool]:
    abs_err = rel_err = 0.0
    ok = True
    for name, ref in want.items():
        a, r = np.asarray(got[name], dtype=np.float64), ref.astype(np.float64)
        diff = np.abs(a - r)
        abs_err = max(abs_err, float(diff.max(initial=0.0)))
        rel_err = max(rel_err, float((diff / np.maximum(np.abs(r), 1e-12)).max(initial=0.0)))
        ok &= bool(np.allclose(a, r, rtol=RTOL, atol=ATOL))
    return abs_err, rel_err, ok


def _onnxruntime(model: "Path | onnx.ModelProto", threads: int = 2):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda feeds: dict(zip(names, session.run(names, feeds)))


def _tvm(model: "Path | onnx.ModelProto", input_types: Mapping) -> Callable[[dict], dict]:
    """TVM's own ONNX importer and its default build (llvm, untuned): the peer users would try."""
    try:
        import tvm
        from tvm import relax
        from tvm.relax.frontend.onnx import from_onnx
    except ImportError:
        raise KilnError("--vs tvm: TVM is not installed (pip install apache-tvm)") from None
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    shapes = {name: tuple(t.shape) for name, t in input_types.items()}
    try:
        executable = tvm.compile(from_onnx(proto, shape_dict=shapes, keep_params_in_input=False), target="llvm")
    except Exception as err:  # noqa: BLE001  (TVM raises its own error types; report them as one line)
        raise KilnError(f"--vs tvm: TVM could not build the model: {str(err).strip().splitlines()[-1]}") from None
    vm = relax.VirtualMachine(executable, tvm.cpu())
    names = [o.name for o in proto.graph.output]
    order = list(input_types)

    def run(feeds: dict) -> dict:
        out = vm["main"](*[tvm.runtime.tensor(feeds[n]) for n in order])
        outs = [out] if hasattr(out, "numpy") else list(out)
        return {name: o.numpy() for name, o in zip(names, outs)}

    return run


def bench(
    model: str | os.PathLike,
    target: str = "llvm",
    vs: Sequence[str] = ("eager", "onnxruntime"),
    shapes: Mapping[str, Sequence[int]] | None = None,
    warmup: int = 3,
    repeat: int = 20,
    progress: Callable[[str, int], Callable[[], None]] | None = None,
    layout: str = "auto",
    profile: bool = False,
    tune: int | None = None,
) -> list[BenchRow]:
    """Time kiln ``target`` and each runtime in ``vs`` on ``model``; rows in that order.

    ``progress(label, total)`` returns a function to call once per run (for a progress bar).
    ``profile``: kiln's compiled target is built with per-kernel timers (``KILN_PROFILE``); its
    row carries the time of every node over the timed runs. The timers cost a few cycles a node.
    ``tune``: MetaSchedule trials for a TVM ``target`` (tuning is part of its setup time).
    """
    path = resolve_model(model, shapes)
    if isinstance(path, onnx.ModelProto):
        shapes = None  # a zoo model: exported at these shapes already
    runtimes = [target, *[r for r in vs if r != target]]
    if "eager" not in runtimes:
        runtimes.append("eager")
    eager_start = time.perf_counter()
    eager = kiln_compile(path, "eager", shapes=shapes)
    eager_setup = time.perf_counter() - eager_start
    feeds = random_inputs(eager.input_types)
    reference = eager.run(feeds)
    batch = next(iter(feeds.values())).shape[0] if feeds and next(iter(feeds.values())).ndim else 1
    rows: list[BenchRow] = []
    measured: dict[str, tuple[float, list[float], dict, int | None]] = {}
    profiled = None
    for runtime in runtimes:
        start = time.perf_counter()
        arena = None
        if runtime == "eager":
            run, setup = eager.run, eager_setup
        elif runtime == "onnxruntime":
            try:
                session = _onnxruntime(path)
            except ImportError:
                raise KilnError("--vs onnxruntime: onnxruntime is not installed (pip install onnxruntime)") from None
            run, setup = session, time.perf_counter() - start
        elif runtime == "tvm":
            run = _tvm(path, eager.input_types)
            setup = time.perf_counter() - start
        elif runtime in ("llvm", "tvm-llvm", "tvm-cuda"):
            timed_kernels = profile and runtime == target == "llvm"
            with config.override(profile=timed_kernels):
                module = kiln_compile(path, runtime, shapes=shapes, layout=layout, tune=tune if runtime == target else None)
            run, setup = module.run, time.perf_counter() - start
            arena = getattr(module.executable, "layout", {}).get("arena_bytes")  # the llvm target's memory plan
            profiled = module.executable if timed_kernels else None
        else:
            raise KilnError(f"unknown runtime {runtime!r} for --vs (kiln targets: eager, llvm, tvm-llvm, tvm-cuda; peers: onnxruntime, tvm)")
        tick = progress(runtime, warmup + repeat) if progress else (lambda: None)
        outputs = run(feeds)
        if profiled is not None and runtime == target:
            profiled.reset_profile()  # the first run may fault pages in: count the steady ones
        times = _time(lambda: run(feeds), warmup, repeat, tick)
        measured[runtime] = (setup, times, outputs, arena)
    eager_median = statistics.median(measured["eager"][1])
    for runtime in runtimes:
        setup, times, outputs, arena = measured[runtime]
        median = statistics.median(times)
        abs_err, rel_err, ok = _errors(outputs, reference)
        rows.append(
            BenchRow(
                runtime=runtime if runtime in ("onnxruntime", "tvm") else f"kiln {runtime}",
                setup_s=setup,
                median_ms=median * 1e3,
                p90_ms=float(np.percentile(times, 90)) * 1e3,
                throughput=batch / median,
                speedup_vs_eager=eager_median / median,
                max_abs_err=abs_err,
                max_rel_err=rel_err,
                matches_eager=ok,
                arena_bytes=arena,
                profile=profiled.profile() if profiled is not None and runtime == target else None,
            )
        )
    return rows


def rows_as_dicts(rows: Sequence[BenchRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def by_op(times: Sequence) -> list[tuple[str, int, float, float]]:
    """A profile summed per op label: (op, nodes, ms, share), the costliest first."""
    totals: dict[str, list] = {}
    for t in times:
        entry = totals.setdefault(t.op, [0, 0.0, 0.0])
        entry[0] += 1
        entry[1] += t.ms
        entry[2] += t.share
    return sorted(((op, n, ms, share) for op, (n, ms, share) in totals.items()), key=lambda r: -r[2])
