"""The training step as one graph: a loss on the model's output, its gradients (autodiff), the
optimizer's update, and the BatchNorm running statistics, with the parameters turned into
inputs so each step reads the current values and returns the next ones.

``training_step(graph, loss, optimizer)`` returns a ``TrainingStep``: the step graph, whose
inputs are ``[model inputs..., parameters..., buffers..., target, optimizer state..., step]``
and whose outputs are ``[loss, new parameters and their new state..., new buffers..., new
step]`` (``next_names`` maps each carried input to its output), and the initial values of
everything it carries from step to step. Training-mode BatchNormalization is decomposed into
reductions and elementwise ops first, which every backend runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kiln.errors import KilnError
from kiln.ir.graph import Graph, Value
from kiln.ir.types import TensorType
from kiln.ir.verify import verify
from kiln.passes.autodiff import GradBuilder, add_gradients
from kiln.passes.counter_random import uniform
from kiln.passes.decompose import decompose_node
from kiln.passes.decompose_rnn import RECURRENT, decompose_rnn
from kiln.passes.rewrite import replace_node

LOSSES = ("ce", "nll", "mse", "l1", "bce")
TARGET = "target"
STEP = "optimizer.step"


@dataclass
class TrainingStep:
    graph: Graph
    params: dict[str, np.ndarray]  # trainable parameters, by name
    buffers: dict[str, np.ndarray]  # carried but not trained (BatchNorm running statistics)
    state: dict[str, np.ndarray]  # optimizer state, by input name
    next_names: dict[str, str] = field(default_factory=dict)  # carried input -> its output
    data_inputs: list[str] = field(default_factory=list)  # the model's inputs, then the target


def target_type(loss: str, output: TensorType) -> TensorType:
    """What the step's ``target`` input holds: one-hot class scores for ce/nll (the trainer
    converts class indices), values shaped like the output otherwise."""
    if loss not in LOSSES:
        raise KilnError(f"unknown loss {loss!r}; kiln has {', '.join(LOSSES)}")
    return output


def attach_loss(graph: Graph, output: Value, loss: str, target: Value) -> Value:
    """The scalar loss of ``output`` against ``target`` (appended to ``graph``)."""
    b = GradBuilder(graph, "loss")
    if loss in ("ce", "nll"):  # -mean over samples (and positions) of sum_c target * log p
        if output.type.rank < 2:
            raise KilnError(f"loss {loss}: the output {output.name!r} {output.type} needs a class axis 1")
        log_p = b.op("LogSoftmax", output, axis=1) if loss == "ce" else output
        picked = b.op("ReduceSum", b.op("Mul", log_p, target), axes=[1], keepdims=0)
        return b.op("Neg", b.op("ReduceMean", picked, axes=None, keepdims=0))
    diff = b.op("Sub", output, target)
    if loss == "mse":
        return b.op("ReduceMean", b.op("Mul", diff, diff), axes=None, keepdims=0)
    if loss == "l1":
        return b.op("ReduceMean", b.op("Abs", diff), axes=None, keepdims=0)
    # bce with logits: max(x, 0) - x * y + log(1 + exp(-|x|))
    stable = b.op("Add", b.op("Sub", b.op("Relu", output), b.op("Mul", output, target)), b.op("Softplus", b.op("Neg", b.op("Abs", output))))
    return b.op("ReduceMean", stable, axes=None, keepdims=0)


def decompose_batchnorm_training(graph: Graph) -> dict[Value, Value]:
    """Training-mode BatchNormalization as reductions and elementwise ops (in place). Returns
    the running statistics it updates: parameter -> its new value."""
    updates: dict[Value, Value] = {}
    for node in [n for n in graph.nodes if n.op.name == "BatchNormalization" and n.attrs["training_mode"]]:
        stats = node.inputs[3:5]
        outputs = decompose_node(graph, node)
        if outputs is not None and len(outputs) > 1:
            updates.update((p, new) for p, new in zip(stats, outputs[1:]) if p in graph.params)
    return updates


def draw_dropout_per_step(graph: Graph, step: Value) -> None:
    """Training-mode Dropout as ``x * keep / (1 - ratio)`` with ``keep`` drawn afresh each step
    from the node's seed and ``step`` (counter-based, so runs stay reproducible): the gradient
    then reads the same mask, a forward value like any other."""
    for node in [n for n in graph.nodes if n.op.name == "Dropout" and n.attrs["training_mode"] and n.attrs["ratio"] > 0]:
        start = len(graph.nodes)
        b = GradBuilder(graph, node.name or "Dropout")
        x, ratio = node.inputs[0], node.attrs["ratio"]
        draw = uniform(b, x.type.shape, node.attrs["seed"], step)
        keep = b.op("GreaterOrEqual", draw, b.const(ratio, draw))
        y = b.op("Mul", x, b.op("Mul", b.op("Cast", keep, to=x.type.dtype.short), b.const(1.0 / (1.0 - ratio), x)))
        replace_node(graph, node, [y, keep], start)


def training_step(graph: Graph, loss: str, optimizer, output: str | None = None, clip_norm: float | None = None, l1: float = 0.0, l2: float = 0.0) -> TrainingStep:
    """The training step of ``graph`` (a copy is changed; ``graph`` is left alone). ``l1`` and
    ``l2`` add ``l1 * sum|w| + l2 * sum w^2`` over the trainable parameters to the loss (the
    loss the step reports includes them); an optimizer's ``weight_decay`` is the other way to
    ask for L2."""
    graph = graph.copy()
    model_params = [v.name for v in graph.params]  # constants the passes below add are not trained
    name = _pick_output(graph, output).name
    updates = {p.name: new.name for p, new in decompose_batchnorm_training(graph).items()}
    data_inputs = [v.name for v in graph.inputs]
    # parameters and buffers become inputs before recurrent nodes are unrolled, so their
    # weights are sliced by nodes the gradients flow back through (not copied into constants)
    by_name = {v.name: v for v in graph.params}
    trainable_names = [n for n in model_params if n not in updates and by_name[n].type.dtype.name.startswith("float")]
    params = {n: graph.params.pop(by_name[n]) for n in trainable_names}
    buffers = {n: graph.params.pop(by_name[n]) for n in updates}
    graph.inputs.extend(by_name[n] for n in [*trainable_names, *buffers])
    if any(node.op.name in RECURRENT for node in graph.nodes):
        graph = decompose_rnn(graph)
    values = {v.name: v for v in graph.values()}
    out = values[name]
    trainable = [values[n] for n in trainable_names]
    step_in = graph.add_input(STEP, TensorType((), trainable[0].type.dtype if trainable else out.type.dtype))
    draw_dropout_per_step(graph, step_in)
    target = graph.add_input(TARGET, target_type(loss, out.type))
    loss_value = _regularized(GradBuilder(graph, "regularization"), attach_loss(graph, out, loss, target), trainable, l1, l2)
    graph.rename(loss_value, graph.fresh_name("loss"))
    grads = add_gradients(graph, loss_value, trainable)

    b = GradBuilder(graph, "optimizer")
    if clip_norm is not None:
        grads = _clip_by_global_norm(b, grads, clip_norm)
    step = b.op("Add", step_in, b.const(1.0, step_in))
    state: dict[str, np.ndarray] = {}
    outputs, next_names = [loss_value], {}
    for p, g in zip(trainable, grads):
        slots = optimizer.state_arrays(params[p.name])
        slot_inputs = {}
        for slot, array in slots.items():
            slot_name = f"optimizer.{slot}/{p.name}"
            slot_inputs[slot] = graph.add_input(slot_name, TensorType.of(array))
            state[slot_name] = array
        new_p, new_state = optimizer.update(b, p, g, slot_inputs, step)
        outputs.append(_named(graph, new_p, f"{p.name}.next"))
        next_names[p.name] = outputs[-1].name
        for slot, value in new_state.items():
            outputs.append(_named(graph, value, f"optimizer.{slot}/{p.name}.next"))
            next_names[f"optimizer.{slot}/{p.name}"] = outputs[-1].name
    for buffer, update in updates.items():  # the running statistics' next values
        outputs.append(_named(graph, values[update], f"{buffer}.next"))
        next_names[buffer] = outputs[-1].name
    # the step count goes last among inputs, as documented
    graph.inputs.remove(step_in)
    graph.inputs.append(step_in)
    outputs.append(_named(graph, step, f"{STEP}.next"))
    next_names[STEP] = outputs[-1].name
    state[STEP] = np.zeros((), dtype=step_in.type.dtype.numpy)
    graph.outputs = outputs
    graph.remove_unread_params()
    verify(graph)
    return TrainingStep(graph, params, buffers, state, next_names, [*data_inputs, TARGET])


def _regularized(b: GradBuilder, loss: Value, weights: list[Value], l1: float, l2: float) -> Value:
    """``loss + l1 * sum|w| + l2 * sum w^2`` over ``weights`` (each term only when asked for)."""
    for strength, penalty in ((l1, lambda w: b.op("Abs", w)), (l2, lambda w: b.op("Mul", w, w))):
        if not strength:
            continue
        if strength < 0:
            raise KilnError(f"regularization strengths must be >= 0, got {strength}")
        for w in weights:
            loss = b.op("Add", loss, b.scale(b.op("ReduceSum", penalty(w), axes=None, keepdims=0), strength))
    return loss


def _pick_output(graph: Graph, output: str | None) -> Value:
    floats = [v for v in graph.outputs if v.type.dtype.name.startswith("float")]
    if output is not None:
        for v in graph.outputs:
            if v.name == output:
                return v
        raise KilnError(f"the model has no output {output!r}; it has {[v.name for v in graph.outputs]}")
    if len(floats) != 1:
        raise KilnError(f"the model has {len(floats)} floating-point outputs ({[v.name for v in floats]}): name the one the loss applies to")
    return floats[0]


def _named(graph: Graph, value: Value, name: str) -> Value:
    graph.rename(value, graph.fresh_name(name))
    return value


def _clip_by_global_norm(b, grads: list[Value], max_norm: float) -> list[Value]:
    """Every gradient scaled by min(1, max_norm / ||all gradients||)."""
    total = None
    for g in grads:
        sq = b.op("ReduceSumSquare", g, axes=None, keepdims=0)
        total = sq if total is None else b.op("Add", total, sq)
    norm = b.op("Sqrt", total)
    factor = b.op("Min", b.const(1.0, norm), b.op("Div", b.const(max_norm, norm), b.op("Add", norm, b.const(1e-6, norm))))
    return [b.op("Mul", g, factor) for g in grads]
