"""dlight's default GPU rules, applied so that one rule's failure is not the build's.

dlight's own ``ApplyDefaultSchedule`` takes the first rule that returns a schedule, and an
exception inside any rule (the GEMV rule's ``assert r_loops`` on a one-tap depthwise conv, a
``set-scope`` error on MaxPool's indices) ends the whole build. Here a rule that raises is a rule
that does not apply: the next one is tried, down to ``Fallback``.

Some schedules are made without complaint and fail only when the module is lowered (a grouped
conv's cross-thread reduction). ``default_schedule(checked=True)`` builds each PrimFunc's
schedule alone before taking it (about 20 ms a PrimFunc), so a schedule that does not lower is
passed over too; the backend builds unchecked first and checks only when that build fails.
"""

from __future__ import annotations


def _rules():
    from tvm.s_tir import dlight as dl

    return (dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback())


def _is_scheduled(func) -> bool:
    return bool(func.attrs is not None and func.attrs.get("tirx.is_scheduled", False))


def _lowers(func, target) -> bool:
    """Whether ``func`` (scheduled) builds for ``target`` on its own."""
    import tvm

    try:
        tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    except Exception:  # noqa: BLE001 - any failure means: try the next rule
        return False
    return True


def schedule(func, target, checked: bool = False):
    """``func`` scheduled by the first of dlight's GPU rules that applies (and, ``checked``,
    lowers), or ``None`` where none does."""
    for rule in _rules():
        try:
            space = rule.apply(func, target, False)
        except Exception:  # noqa: BLE001 - dlight's rules assert their own preconditions
            continue
        if space is None:
            continue
        sch = space[0] if isinstance(space, list) else space
        scheduled = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        if checked and not _lowers(scheduled, target):
            continue
        return scheduled
    return None


def default_schedule(target, checked: bool = False):
    """A module pass scheduling every unscheduled PrimFunc (``schedule``); PrimFuncs a tuning
    database already scheduled are kept."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="KilnDefaultGPUSchedule")
    def apply(mod, _ctx):
        mod = mod.clone()  # the caller's module may be built again (checked) after a failure
        updated = {}
        for gvar, func in mod.functions_items():
            if isinstance(func, tirx.PrimFunc) and not _is_scheduled(func):
                scheduled = schedule(func, func.attrs.get("target", target) if func.attrs is not None else target, checked)
                if scheduled is not None:
                    updated[gvar] = scheduled
        for gvar, func in updated.items():
            mod[gvar] = func
        return mod

    return apply
