"""Training (``kiln.train``): ``Trainer`` compiles a model's whole training step (forward, loss,
gradients, optimizer update) into one module for the chosen target and runs it batch by batch.

The model is a DSL module (traced in training mode) or an ONNX model (a path, a zoo name or a
ModelProto; its float initializers become the trainable parameters). The trainer holds the
parameters, BatchNorm statistics and optimizer state, feeds them to every step and takes the
next ones back, so the compiled step stays a pure function: numpy arrays on llvm and eager,
device tensors on the TVM targets (the parameters stay on the GPU between steps). Static shapes: one module
is compiled per batch size met (a last, smaller batch gets its own).
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from kiln.errors import KilnError
from kiln.fileio import npz_bytes, write_atomic
from kiln.ir.graph import Graph
from kiln.optim import Adam, Optimizer
from kiln.passes.training import LOSSES, TARGET, TrainingStep, training_step

CHECKPOINT_FORMAT = 1


class Trainer:
    """``Trainer(model, loss="ce", optimizer=kiln.optim.Adam(lr=1e-3), target="llvm")``.

    ``step(x, y) -> loss``; ``fit((x, y), epochs, batch_size)`` -> per-epoch metrics;
    ``evaluate(x, y)`` -> loss (and accuracy for ce/nll); ``save``/``load`` checkpoints (npz +
    JSON); ``export(path)`` writes the trained inference model as ONNX. For ce and nll, ``y``
    holds class indices (axis 1 of the output is the class axis); for mse, l1 and bce, targets
    shaped like the output. ``target`` defaults to llvm, compiled code for this CPU, as
    ``kiln train`` does; ``"eager"`` runs the step op by op in numpy.
    """

    def __init__(
        self,
        model: Any,
        loss: str = "ce",
        optimizer: Optimizer | None = None,
        target: str = "llvm",
        output: str | None = None,
        clip_norm: float | None = None,
        l1: float = 0.0,
        l2: float = 0.0,
        input_name: str | None = None,
        arch: str | None = None,
        recompute: bool = False,
    ):
        if loss not in LOSSES:
            raise KilnError(f"unknown loss {loss!r}; kiln has {', '.join(LOSSES)}")
        self.model = model
        self.loss = loss
        self.optimizer = optimizer or Adam()
        self.target = target
        self.output = output
        self.clip_norm = clip_norm
        self.l1, self.l2 = l1, l2  # penalties on the trainable parameters, added to the loss
        self.input_name = input_name
        self.arch = arch  # the GPU generation for tvm-cuda
        self.recompute = recompute  # rebuild cheap activations where the gradient reads them (less memory)
        self.values: dict[str, np.ndarray] = {}  # parameters, buffers and optimizer state, by name
        self.trainable: list[str] = []
        self._steps: dict[tuple, tuple[TrainingStep, Any]] = {}
        self._evals: dict[tuple, tuple[Graph, Any]] = {}
        self.steps_done = 0
        self._model_proto = None  # an ONNX model, read once (its batch dim made symbolic)

    # -- graphs ----------------------------------------------------------------------------
    def _graph(self, x: np.ndarray, training: bool) -> Graph:
        """The model's graph for inputs shaped like ``x`` (training or inference mode)."""
        from kiln.frontend.dsl.module import Module as DSLModule

        if isinstance(self.model, DSLModule):
            from kiln.frontend.dsl.trace import trace

            mode = self.model.training
            self.model.train(training)
            try:
                return trace(self.model, [x], input_names=[self.input_name or "input"])
            finally:
                self.model.train(mode)
        if isinstance(self.model, Graph):
            if tuple(self.model.inputs[0].type.shape) != x.shape:
                raise KilnError(f"the graph takes {self.model.inputs[0].type}; batches of shape {list(x.shape)} need a graph built for them")
            return self.model
        from kiln.driver import to_graph

        proto = self._proto()
        return to_graph(proto, shapes={self.input_name or _single_input(proto): x.shape})

    def _proto(self):
        import onnx

        from kiln.driver import resolve_model
        from kiln.frontend.onnx import load_model

        if self._model_proto is None:
            if isinstance(self.model, onnx.ModelProto):
                proto = self.model
            else:
                found = resolve_model(self.model)  # a path (checked, read safely) or a zoo export
                proto = found if isinstance(found, onnx.ModelProto) else load_model(found)
            self._model_proto = _batch_free(proto, self.input_name or _single_input(proto))
        return self._model_proto

    def _step_module(self, x: np.ndarray):
        key = (x.shape, str(x.dtype))
        if key not in self._steps:
            import kiln

            step = training_step(self._graph(x, True), self.loss, self.optimizer, self.output, self.clip_norm, self.l1, self.l2)
            for name, array in {**step.params, **step.buffers, **step.state}.items():
                self.values.setdefault(name, np.array(array, copy=True))
            self.trainable = list(step.params)
            # eager runs the graph as built (-O0, no memory plan): nothing to recompute there
            # each step's new parameters and state are written over the current ones (llvm)
            donate = {next_name: name for name, next_name in step.next_names.items()}
            module = kiln.compile(step.graph, target=self.target, layout="nchw", arch=self.arch, recompute=self.recompute and self.target != "eager", donate=donate)
            self._steps[key] = (step, module)
        return self._steps[key]

    # -- running ---------------------------------------------------------------------------
    def _target_array(self, step: TrainingStep, y: np.ndarray) -> np.ndarray:
        t = next(v.type for v in step.graph.inputs if v.name == TARGET)
        if self.loss in ("ce", "nll"):  # class indices -> one-hot along axis 1
            classes = t.shape[1]
            index = np.asarray(y).astype(np.int64)
            if t.rank > 2 and index.shape == (t.shape[0],) and all(d == 1 for d in t.shape[2:]):  # (N, C, 1, 1) logits: one class per sample
                index = index.reshape((t.shape[0], *t.shape[2:]))
            if index.shape != (t.shape[0], *t.shape[2:]):
                raise KilnError(f"targets of shape {list(index.shape)}: the model's output {t} needs class indices of shape {[t.shape[0], *t.shape[2:]]}")
            if index.size and (index.min() < 0 or index.max() >= classes):
                raise KilnError(f"class indices must lie in [0, {classes}); got {index.min()}..{index.max()}")
            hot = np.moveaxis(np.eye(classes, dtype=t.dtype.numpy)[index], -1, 1)
            return np.ascontiguousarray(hot)
        y = np.asarray(y, dtype=t.dtype.numpy)
        if y.shape != t.shape:
            raise KilnError(f"targets of shape {list(y.shape)}: the model's output is {t}")
        return y

    def step(self, x: np.ndarray, y: np.ndarray) -> float:
        """One optimizer step on the batch ``(x, y)``; returns the batch's loss."""
        x = np.asarray(x, dtype=np.float32) if np.asarray(x).dtype.kind == "f" else np.asarray(x)
        step, module = self._step_module(x)
        feeds = {step.data_inputs[0]: x, TARGET: self._target_array(step, y)}
        for v in step.graph.inputs:
            if v.name not in feeds:
                feeds[v.name] = self.values[v.name]
        executable = module.executable
        if hasattr(executable, "run_device"):  # TVM: the carried values stay device tensors
            outs = executable.run_device([feeds[v.name] for v in step.graph.inputs])
            out = dict(zip([v.name for v in step.graph.outputs], outs))
        else:
            out = module.run(feeds)
        for name, next_name in step.next_names.items():
            self.values[name] = out[next_name]
        self.steps_done += 1
        return float(_host(out[step.graph.outputs[0].name]))

    def host_values(self) -> dict[str, np.ndarray]:
        """The carried values as numpy arrays (copied from the device where they live there)."""
        return {name: _host(value) for name, value in self.values.items()}

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The model's output for ``x`` in inference mode, with the current weights."""
        import kiln

        x = np.asarray(x, dtype=np.float32) if np.asarray(x).dtype.kind == "f" else np.asarray(x)
        key = (x.shape, str(x.dtype))
        if key not in self._evals:
            graph = self._graph(x, False)
            for v in [v for v in graph.params if v.type.dtype.name.startswith("float")]:
                self.values.setdefault(v.name, np.array(graph.params.pop(v), copy=True))
                graph.inputs.append(v)  # fed the current values: one compile serves every step
            self._evals[key] = (graph, kiln.compile(graph, target=self.target, layout="nchw", arch=self.arch))
        graph, module = self._evals[key]
        feeds = {graph.inputs[0].name: x}
        feeds.update((v.name, _host(self.values[v.name])) for v in graph.inputs[1:])
        out = module.run(feeds)
        return out[self.output] if self.output else next(iter(out.values()))

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch_size: int = 2048) -> dict[str, float]:
        """Mean loss (and accuracy for ce/nll) over ``(x, y)`` in inference mode (one module per
        batch shape: the whole set at once up to ``batch_size``)."""
        losses, correct, count = [], 0, 0
        for xb, yb in _batches(x, y, batch_size, None):
            out = self.predict(xb).astype(np.float64)
            losses.append(_host_loss(self.loss, out, yb) * len(xb))
            if self.loss in ("ce", "nll"):
                correct += int((out.argmax(axis=1) == np.asarray(yb)).sum())
                count += int(np.asarray(yb).size)
        metrics = {"loss": float(sum(losses) / len(x))}
        if self.loss in ("ce", "nll"):
            metrics["accuracy"] = correct / max(count, 1)
        return metrics

    def fit(
        self,
        data: tuple[np.ndarray, np.ndarray],
        epochs: int = 1,
        batch_size: int = 32,
        validation: tuple[np.ndarray, np.ndarray] | None = None,
        seed: int = 0,
        progress: bool = True,
        drop_last: bool = True,
    ) -> list[dict[str, float]]:
        """Train for ``epochs`` over shuffled batches; returns each epoch's metrics. A last,
        smaller batch is dropped unless ``drop_last=False`` (it would compile a second step)."""
        x, y = data
        if len(x) != len(y):
            raise KilnError(f"fit: {len(x)} inputs but {len(y)} targets")
        rng = np.random.default_rng(seed)
        history = []
        bar = _progress(progress)
        with bar:
            per_epoch = len(x) // batch_size if drop_last and len(x) >= batch_size else -(-len(x) // batch_size)
            task = bar.add_task("training", total=epochs * per_epoch)
            for epoch in range(1, epochs + 1):
                losses, seen = [], 0
                for xb, yb in itertools.islice(_batches(x, y, batch_size, rng), per_epoch):
                    losses.append(self.step(xb, yb) * len(xb))
                    seen += len(xb)
                    bar.update(task, advance=1, description=f"epoch {epoch}/{epochs} loss {losses[-1] / len(xb):.4f}")
                metrics = {"epoch": epoch, "loss": sum(losses) / seen}
                if self.loss in ("ce", "nll"):
                    metrics["accuracy"] = self.evaluate(x, y)["accuracy"]
                if validation is not None:
                    metrics.update({f"val_{k}": v for k, v in self.evaluate(*validation).items()})
                history.append(metrics)
        self.sync()
        return history

    # -- the trained model -----------------------------------------------------------------
    def sync(self) -> None:
        """Copy the trained values into the DSL module's parameters and buffers."""
        from kiln.frontend.dsl.module import Module as DSLModule

        if isinstance(self.model, DSLModule) and self.values:
            state = self.model.state_dict()
            state.update({k: v for k, v in self.host_values().items() if k in state})
            self.model.load_state_dict(state)

    def export(self, path: str | os.PathLike, example: np.ndarray | None = None) -> None:
        """Write the trained inference model as ONNX (atomically)."""
        import onnx
        from onnx import numpy_helper

        from kiln.frontend.dsl.module import Module as DSLModule

        if isinstance(self.model, DSLModule):
            import kiln

            if example is None:
                raise KilnError("export of a DSL model needs an example input")
            self.sync()
            self.model.eval()
            kiln.export_onnx(self.model, path, [example], input_names=[self.input_name or "input"])
            return
        proto = onnx.ModelProto.FromString(self._proto().SerializeToString())
        values = self.host_values()
        for init in proto.graph.initializer:
            if init.name in values:
                init.CopyFrom(numpy_helper.from_array(values[init.name].astype(numpy_helper.to_array(init).dtype), init.name))
        write_atomic(path, proto.SerializeToString())

    def save(self, path: str | os.PathLike) -> None:
        """A checkpoint: ``PATH.npz`` (every carried array) and ``PATH.json`` (settings)."""
        base = Path(path).with_suffix("")
        meta = {
            "format": CHECKPOINT_FORMAT,
            "loss": self.loss,
            "optimizer": {"name": type(self.optimizer).__name__, **_plain(vars(self.optimizer))},
            "steps_done": self.steps_done,
            "trainable": self.trainable,
            "arrays": sorted(self.values),
        }
        write_atomic(base.with_suffix(".npz"), npz_bytes({_key(k): v for k, v in self.host_values().items()}))
        write_atomic(base.with_suffix(".json"), json.dumps(meta, indent=1).encode())

    def load(self, path: str | os.PathLike) -> None:
        """Restore a checkpoint written by ``save`` (arrays checked against the model's)."""
        base = Path(path).with_suffix("")
        try:
            meta = json.loads(base.with_suffix(".json").read_text())
            with np.load(base.with_suffix(".npz"), allow_pickle=False) as data:
                arrays = {name: data[_key(name)] for name in meta["arrays"]}
        except (OSError, ValueError, KeyError) as err:
            raise KilnError(f"{base}: not a readable kiln checkpoint ({err})") from None
        if meta.get("format") != CHECKPOINT_FORMAT or meta.get("loss") != self.loss:
            raise KilnError(f"{base}: a checkpoint of format {meta.get('format')} for loss {meta.get('loss')!r}; this trainer uses format {CHECKPOINT_FORMAT}, loss {self.loss!r}")
        for name, array in arrays.items():
            known = _host(self.values[name]) if name in self.values else None
            if known is not None and (known.shape != array.shape or known.dtype != array.dtype):
                raise KilnError(f"{base}: {name!r} is {array.dtype}{list(array.shape)}, the model's is {known.dtype}{list(known.shape)}")
        self.values.update(arrays)
        self.trainable = list(meta["trainable"])
        self.steps_done = int(meta["steps_done"])


def _host(value) -> np.ndarray:
    return value if isinstance(value, np.ndarray) else value.numpy()


def _key(name: str) -> str:
    """An npz member name for a value name (npz members cannot hold '/')."""
    return name.replace("%", "%25").replace("/", "%2F")


def _plain(config: Mapping[str, Any]) -> dict:
    return {k: v for k, v in config.items() if isinstance(v, (int, float, bool, str))}


def _single_input(proto) -> str:
    initializers = {t.name for t in proto.graph.initializer}
    names = [i.name for i in proto.graph.input if i.name not in initializers]
    if len(names) != 1:
        raise KilnError(f"the model has inputs {names}: training takes a model with one input (name it with input_name=)")
    return names[0]


def _batch_free(proto, input_name: str):
    """A copy of ``proto`` whose input's first dim is symbolic (exports often fix the batch
    they were traced at; training picks its own). Nodes that bake the batch in still refuse."""
    import onnx

    free = onnx.ModelProto.FromString(proto.SerializeToString())
    for value in free.graph.input:
        if value.name == input_name and value.type.tensor_type.shape.dim:
            dim = value.type.tensor_type.shape.dim[0]
            dim.ClearField("dim_value")
            dim.dim_param = "batch"
    return free


def _batches(x, y, batch_size: int, rng) -> Iterable[tuple[np.ndarray, np.ndarray]]:
    order = rng.permutation(len(x)) if rng is not None else np.arange(len(x))
    for start in range(0, len(x), batch_size):
        index = order[start : start + batch_size]
        yield x[index], np.asarray(y)[index]


def _host_loss(loss: str, out: np.ndarray, y) -> float:
    y = np.asarray(y)
    if loss in ("ce", "nll"):
        log_p = out - out.max(axis=1, keepdims=True) - np.log(np.exp(out - out.max(axis=1, keepdims=True)).sum(axis=1, keepdims=True)) if loss == "ce" else out
        picked = np.take_along_axis(log_p, np.expand_dims(y.astype(np.int64), 1), axis=1)
        return float(-picked.mean())
    if loss == "mse":
        return float(np.mean((out - y) ** 2))
    if loss == "l1":
        return float(np.mean(np.abs(out - y)))
    return float(np.mean(np.maximum(out, 0) - out * y + np.log1p(np.exp(-np.abs(out)))))


def _progress(enabled: bool):
    if not enabled:
        return _NoBar()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=False)


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *args, **kwargs):
        return None

    def update(self, *args, **kwargs):
        return None


__all__ = ["Trainer"]
