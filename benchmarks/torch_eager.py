"""PyTorch eager as a benchmark peer: runs a kiln graph (as imported, unoptimized) op by op with
torch's own kernels (cuDNN convolutions and LSTMs on CUDA), which is what a PyTorch model of the
same network runs in eager mode.

Only the ops the zoo's inference graphs use are covered; anything else raises, naming the op.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from kiln.ir.graph import Graph, Node


def torch_runner(graph: Graph, device: str) -> Callable[[dict], dict]:
    """``run({input name: tensor}) -> {output name: tensor}`` on ``device`` ("cuda", "cpu")."""
    import torch

    params = {id(v): torch.from_numpy(np.array(a, copy=True)).to(device) for v, a in graph.params.items()}
    steps = [(node, _op(node, params, device)) for node in graph.nodes]

    @torch.no_grad()
    def run(feeds: dict) -> dict:
        env = dict(params)
        env.update((id(v), feeds[v.name]) for v in graph.inputs)
        for node, fn in steps:
            outs = fn(*[env[id(v)] if v is not None else None for v in node.inputs])
            outs = outs if isinstance(outs, tuple) else (outs,)
            env.update((id(v), t) for v, t in zip(node.outputs, outs))
        return {v.name: env[id(v)] for v in graph.outputs}

    return run


def _pads(attrs, nd):
    pads = attrs["pads"] or [0] * (2 * nd)
    if pads[:nd] != pads[nd:]:
        raise NotImplementedError("asymmetric pads")
    return tuple(pads[:nd])


def _op(node: Node, params: dict, device: str):  # noqa: C901 - one table of ops
    import torch
    import torch.nn.functional as F

    a, name = node.attrs, node.op.name
    if name == "Conv":
        nd = len(node.inputs[0].type.shape) - 2
        conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
        return lambda x, w, b=None: conv(x, w, b, a["strides"] or 1, _pads(a, nd), a["dilations"] or 1, a["group"])
    if name == "ConvTranspose":
        nd = len(node.inputs[0].type.shape) - 2
        opad = a["output_padding"] or 0
        return lambda x, w, b=None: F.conv_transpose2d(x, w, b, a["strides"] or 1, _pads(a, nd), opad, a["group"], a["dilations"] or 1)
    if name == "BatchNormalization":
        return lambda x, s, b, m, v: F.batch_norm(x, m, v, s, b, False, 0.0, a["epsilon"])
    if name == "MaxPool":
        nd = len(a["kernel_shape"])
        return lambda x: F.max_pool2d(x, a["kernel_shape"], a["strides"], _pads(a, nd), a["dilations"] or 1, bool(a["ceil_mode"]))
    if name == "AveragePool":
        nd = len(a["kernel_shape"])
        return lambda x: F.avg_pool2d(x, a["kernel_shape"], a["strides"], _pads(a, nd), bool(a["ceil_mode"]), bool(a["count_include_pad"]))
    if name == "GlobalAveragePool":
        return lambda x: x.mean(dim=tuple(range(2, x.dim())), keepdim=True)
    if name == "Gemm":
        def gemm(x, w, b=None):
            x = x.t() if a["transA"] else x
            w = w.t() if a["transB"] else w
            y = (x @ w) * a["alpha"]
            return y + b * a["beta"] if b is not None else y
        return gemm
    simple = {
        "Relu": torch.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Add": torch.add,
        "Mul": torch.mul, "Sub": torch.sub, "Div": torch.div, "MatMul": torch.matmul,
        "Identity": lambda x: x,
    }  # fmt: skip
    if name in simple:
        return simple[name]
    if name == "Reshape":
        return lambda x: x.reshape(node.outputs[0].type.shape)
    if name == "Transpose":
        return lambda x: x.permute(a["perm"])
    if name == "Concat":
        return lambda *xs: torch.cat(xs, a["axis"])
    if name == "Softmax":
        return lambda x: torch.softmax(x, a["axis"])
    if name == "Slice":
        from kiln.ir.ops.shape import _slices

        index = _slices(a, node.inputs[0].type.shape)
        return lambda x: x[index]
    if name == "Gather":
        return lambda x, i: torch.index_select(x, a["axis"], i.reshape(-1).long()).reshape(node.outputs[0].type.shape)
    if name == "Resize":
        size = tuple(a["sizes"][2:])
        if a["mode"] == "nearest":
            return lambda x, *_: F.interpolate(x, size=size, mode="nearest")
        align = a["coordinate_transformation_mode"] == "align_corners"
        return lambda x, *_: F.interpolate(x, size=size, mode="bilinear", align_corners=align)
    if name in ("LSTM", "GRU"):
        return _recurrent(node, params, device)
    raise NotImplementedError(f"torch_eager: no torch mapping for {name}")


def _recurrent(node: Node, params: dict, device: str):
    """A cuDNN nn.LSTM / nn.GRU holding the ONNX weights (gate order converted)."""
    import torch

    a = node.attrs
    hidden = a["hidden_size"]
    w, r, b = (params[id(v)] if v is not None else None for v in node.inputs[1:4])
    directions, _, inputs = w.shape
    lstm = node.op.name == "LSTM"
    # ONNX LSTM gates i, o, f, c -> torch i, f, g, o; GRU z, r, h -> torch r, z, n
    order = [0, 2, 3, 1] if lstm else [1, 0, 2]
    cls = torch.nn.LSTM if lstm else torch.nn.GRU
    if not lstm and not a.get("linear_before_reset", 0):
        raise NotImplementedError("torch_eager: GRU with linear_before_reset=0 has no cuDNN twin")
    module = cls(inputs, hidden, bidirectional=directions == 2).to(device)

    def gates(t):
        return torch.cat([t.reshape(len(order), hidden, -1)[i] for i in order]).reshape(-1, *t.shape[1:])

    with torch.no_grad():
        for d in range(directions):
            suffix = "_reverse" if d else ""
            getattr(module, f"weight_ih_l0{suffix}").copy_(gates(w[d]))
            getattr(module, f"weight_hh_l0{suffix}").copy_(gates(r[d]))
            bias = b[d] if b is not None else torch.zeros(2 * len(order) * hidden, device=device)
            getattr(module, f"bias_ih_l0{suffix}").copy_(gates(bias[: len(order) * hidden].reshape(-1, 1)).reshape(-1))
            getattr(module, f"bias_hh_l0{suffix}").copy_(gates(bias[len(order) * hidden :].reshape(-1, 1)).reshape(-1))

    def run(x, *rest):
        y, state = module(x)
        h = state[0] if lstm else state
        steps, batch = x.shape[:2]
        y = y.reshape(steps, batch, directions, hidden).permute(0, 2, 1, 3)
        return (y, h, state[1]) if lstm else (y, h)

    return run
