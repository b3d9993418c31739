"""If and Loop, resolved at compile time: kiln's graphs are static, so the branch taken and the
trip count are shape-determining. ``If`` inlines the branch its (static) condition picks;
``Loop`` unrolls its body while the trip count and the condition are known. A condition that
depends on graph inputs raises NeedsStaticValue, and the ONNX backend specializes on it."""

from __future__ import annotations

import numpy as np

from kiln.frontend.onnx.importer import NodeContext, converter

MAX_UNROLL = 4096


@converter("If")
def _if(ctx: NodeContext):
    cond = ctx.const(0, "cond")
    if cond.size != 1:
        raise ctx.error(f"cond must hold one element, got shape {cond.shape}")
    branch = ctx.attr("then_branch") if bool(cond.reshape(-1)[0]) else ctx.attr("else_branch")
    return ctx.importer.inline(branch, {}, ctx.name)


@converter("Loop")
def _loop(ctx: NodeContext):
    body = ctx.attr("body")
    importer = ctx.importer
    trip = ctx.const(0, "M")
    trips = int(trip.reshape(())) if trip is not None else None
    cond = ctx.input(1) or ctx.constant(np.array(True))
    keep_going = bool(ctx.const(1, "cond").reshape(())) if ctx.has_input(1) else True
    carried = [ctx.input(i) for i in range(2, ctx.num_inputs)]
    n_scan = len(body.output) - 1 - len(carried)
    scans: list[list] = [[] for _ in range(n_scan)]
    names = [i.name for i in body.input]
    step = 0
    while keep_going and (trips is None or step < trips):
        if step >= MAX_UNROLL:
            raise ctx.error(f"unrolling stopped after {MAX_UNROLL} iterations (trip count unknown or too large)")
        bindings = {names[0]: ctx.constant(np.array(step, np.int64)), names[1]: cond}
        bindings.update(zip(names[2:], carried))
        outs = importer.inline(body, bindings, f"{ctx.name}/iteration{step}")
        cond, carried = outs[0], outs[1 : 1 + len(carried)]
        for k, value in enumerate(outs[1 + len(carried) :]):
            scans[k].append(ctx.reshape(value, (1,) + value.type.shape))
        keep_going = bool(importer.static_value(cond, f"node {ctx.name!r} (Loop): the body's condition").reshape(()))
        step += 1
    if n_scan and step == 0:
        raise ctx.error("a Loop that runs no iteration has scan outputs of unknown shape")
    stacked = [parts[0] if len(parts) == 1 else ctx.emit("Concat", parts, {"axis": 0})[0] for parts in scans]
    return carried + stacked


@converter("Scan")
def _scan(ctx: NodeContext):
    """Unrolled: the body runs once per step over slices of the scan inputs (opset >= 9)."""
    if ctx.opset < 9:
        raise ctx.error("Scan before opset 9 (with a batch axis and sequence_lens) is not supported")
    body = ctx.attr("body")
    n_scan = ctx.attr("num_scan_inputs")
    inputs = ctx.inputs()
    states, scanned = inputs[: len(inputs) - n_scan], inputs[len(inputs) - n_scan :]
    in_axes = [a % v.type.rank for a, v in zip(ctx.attr("scan_input_axes") or [0] * n_scan, scanned)]
    in_dirs = ctx.attr("scan_input_directions") or [0] * n_scan
    lengths = {v.type.shape[a] for v, a in zip(scanned, in_axes)}
    if len(lengths) != 1:
        raise ctx.error(f"scan inputs have different lengths {sorted(lengths)}")
    steps = lengths.pop()
    if steps > MAX_UNROLL:
        raise ctx.error(f"{steps} steps is more than the {MAX_UNROLL} kiln unrolls")
    n_out = len(body.output) - len(states)
    names = [i.name for i in body.input]
    collected: list[list] = [[] for _ in range(n_out)]
    for step in range(steps):
        bindings = dict(zip(names, states))
        for k, (value, axis, reverse) in enumerate(zip(scanned, in_axes, in_dirs)):
            t = steps - 1 - step if reverse else step
            part = ctx.emit("Slice", [value], {"starts": [t], "ends": [t + 1], "axes": [axis], "steps": None})[0]
            shape = [d for i, d in enumerate(value.type.shape) if i != axis]
            bindings[names[len(states) + k]] = ctx.reshape(part, shape)
        outs = ctx.importer.inline(body, bindings, f"{ctx.name}/step{step}")
        states = outs[: len(states)]
        for k, value in enumerate(outs[len(states) :]):
            collected[k].append(value)
    out_axes = ctx.attr("scan_output_axes") or [0] * n_out
    out_dirs = ctx.attr("scan_output_directions") or [0] * n_out
    results = []
    for parts, axis, reverse in zip(collected, out_axes, out_dirs):
        if not parts:
            raise ctx.error("a Scan with no steps has scan outputs of unknown shape")
        rank = parts[0].type.rank + 1
        axis %= rank
        if reverse:
            parts = parts[::-1]
        expanded = [ctx.reshape(p, p.type.shape[:axis] + (1,) + p.type.shape[axis:]) for p in parts]
        results.append(expanded[0] if len(expanded) == 1 else ctx.emit("Concat", expanded, {"axis": axis})[0])
    return list(states) + results
