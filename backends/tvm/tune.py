"""MetaSchedule tuning of the TVM backend's kernels (``--tune TRIALS``).

Every PrimFunc of the lowered module is a tuning task (the same kernel called twice is one
task, weighted by its calls). MetaSchedule searches schedules for them, builds and times the
candidates on the target's device, and keeps the best in a JSON database in kiln's cache folder
(``tune/<target>``), one per target. A task whose kernel the database already holds is not tuned
again: a second compile of the model, or of another model sharing its kernels, reuses the
records. ``relax_pipeline`` then applies the database; dlight (CUDA) or TVM's defaults (CPU)
take the kernels without a record.

Tuning needs the ``tune`` extra (psutil, cloudpickle and xgboost-cpu: TVM's worker pools and
its cost model) and, for tvm-cuda, the GPU it measures on.
"""

from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager
from pathlib import Path

from kiln.backends.cache import cache_dir
from kiln.errors import KilnError

# what tuning imports besides TVM, and the extra that installs it
NEEDS = {"psutil": "psutil", "cloudpickle": "cloudpickle", "xgboost": "xgboost-cpu"}


def check_requirements(target) -> None:
    """KilnError unless tuning can run here: the extra's packages, and the GPU for tvm-cuda."""
    import importlib.util

    missing = [package for module, package in NEEDS.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise KilnError(f"--tune needs {', '.join(missing)}: pip install 'kiln[tune]'")
    if target.kind == "cuda":
        target.device()  # KilnError without a GPU: tuning measures every candidate on it


@contextmanager
def database(target):
    """The target's tuning database in kiln's cache folder; a temporary one where caching is off."""
    from tvm.s_tir import meta_schedule as ms

    folder = database_path(target)
    if folder is None:
        with tempfile.TemporaryDirectory(prefix="kiln-tune-") as scratch:
            yield ms.database.JSONDatabase(work_dir=scratch)
        return
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    yield ms.database.JSONDatabase(work_dir=str(folder))


def _tuned(db, mod) -> bool:
    return db.has_workload(mod) and bool(db.get_top_k(db.commit_workload(mod), 1))


def tune(module, target, trials: int, db, progress: bool = True) -> int:
    """Tune the kernels of ``module`` (legalized Relax) that ``db`` holds no record of, with up
    to ``trials`` measured candidates in all; returns how many tasks were tuned. The caller has
    run ``check_requirements``."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    tvm_target = target.tvm_target()
    if target.kind == "llvm":  # MetaSchedule parallelizes over this many cores
        tvm_target = tvm.target.Target({**tvm_target.export(), "num-cores": _cores()})
    tasks = [t for t in ms.relax_integration.extract_tasks(module, tvm_target) if not _tuned(db, t.dispatched[0])]
    if not tasks:
        return 0
    with tempfile.TemporaryDirectory(prefix="kiln-tune-logs-") as logs, _quiet():
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(tasks, logs, num_threads=_cores())
        callbacks = ms.measure_callback.MeasureCallback.create("default")
        with _progress_bar(trials, len(contexts), enabled=progress) as bar:
            if bar is not None:
                callbacks = [*callbacks, bar]
            ms.tune.tune_tasks(
                tasks=contexts,
                task_weights=weights,
                work_dir=logs,
                max_trials_global=trials,
                num_trials_per_iter=max(1, min(64, trials // len(contexts))),  # a round for every task
                builder=ms.builder.LocalBuilder(f_build=build_candidate, max_workers=_cores()),
                database=db,
                measure_callbacks=callbacks,
            )
    return len(contexts)


def build_candidate(mod, target, _params):
    """MetaSchedule's default build of one candidate, run in its worker processes, without its
    ``import tvm.s_tir.tensor_intrin``: that parses every target's tensor intrinsics (20 s here)
    in each worker of each batch. Candidates are scheduled (and tensorized) in the tuning
    process; building them needs no intrinsic registered."""
    from tvm.driver import build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    return build(RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod), target=target)


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextmanager
def _quiet():
    """MetaSchedule logs every round at INFO; kiln shows a progress bar instead."""
    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


@contextmanager
def _progress_bar(trials: int, tasks: int, enabled: bool):
    """A rich progress bar advanced by each measured candidate (a MetaSchedule measure callback)."""
    if not enabled:
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    columns = (TextColumn("tuning {task.fields[tasks]} kernels"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as progress:  # stdout stays the command's
        bar = progress.add_task("tune", total=trials, tasks=tasks)

        @derived_object
        class AdvanceBar(PyMeasureCallback):
            def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
                progress.advance(bar, len(runner_results))

        yield AdvanceBar()


def database_path(target) -> Path | None:
    """Where the target's tuning records live (None with caching off)."""
    root = cache_dir()
    return None if root is None else root / "tune" / (f"{target.name}-{target.arch}" if target.arch else target.name)
