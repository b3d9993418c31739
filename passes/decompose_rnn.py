"""decompose_rnn: LSTM, GRU and RNN nodes unrolled into GEMMs and elementwise gate math.

For backends without a recurrent kernel (llvm). Per direction, the input projection of every
time step is one GEMM over (seq * batch) rows; each step then adds one GEMM with the recurrent
weights (the projection of step t as its C operand) and the gate arithmetic, which the fusion
pass groups into one kernel per step.

Sequence lengths (a run-time input) mask each step: a row past its length keeps its state and
outputs zeros. The reverse direction then runs forward over each row's prefix reversed
(ReverseSequence), as the reference walks it.

Every attribute is expressed: the activations ONNX lists (with their alpha/beta), clip on
the gates' pre-activations, LSTM's input_forget and peepholes.

DynamicQuantizeLSTM unrolls as LSTM does, its two products in integers: the input sequence
quantized once (DynamicQuantizeLinear over every step up to the longest sequence), each step's
state quantized again, each product a MatMulInteger by the 8-bit weights scaled back to float
(the llvm backend's VNNI kernel where it has one).

Preconditions: none. Postconditions: no LSTM/GRU/RNN node remains; outputs keep their names, so graph outputs are unchanged.
"""

from __future__ import annotations

import numpy as np

from kiln.errors import KilnError
from kiln.ir.graph import Graph, Node, Value
from kiln.ir.ops.rnn import DEFAULT_ACTIVATIONS, DEFAULT_ALPHA, DEFAULT_BETA
from kiln.passes.base import graph_pass

RECURRENT = {"LSTM": 4, "GRU": 3, "RNN": 1, "DynamicQuantizeLSTM": 4}


class _Unroller:
    """Emits the unrolled form of one recurrent node into ``g`` (appending nodes in order)."""

    def __init__(self, g: Graph, node: Node, taken: set[str]):
        self.g, self.node, self.where = g, node, node.name or node.op.name
        self.taken = taken  # the names of the graph being rebuilt: new values must not take them
        self.count = 0
        self.peep: list[Value] | None = None  # LSTM peephole weights of the direction being unrolled
        self.direction_index = 0  # which direction's activations apply
        self.kind = "LSTM" if node.op.name == "DynamicQuantizeLSTM" else node.op.name
        self.quantized = node.op.name == "DynamicQuantizeLSTM"
        self.h_scale = None  # a quantized op's current recurrent weights' scale (and zero point)
        self.h_rows: Value | None = None  # ... and the state its step quantizes

    def fresh(self, hint: str) -> str:
        name = self.g.fresh_name(hint)
        while name in self.taken:
            name = self.g.fresh_name(name + "_")
        return name

    def add_param(self, hint: str, array: np.ndarray) -> Value:
        return self.g.add_param(self.fresh(f"{self.where}.{hint}"), array)

    def emit(self, op: str, inputs, attrs=None, num_outputs=None) -> list[Value]:
        self.count += 1
        node = self.g.add_node(op, inputs, attrs or {}, name=f"{self.where}/{op}_{self.count}", num_outputs=num_outputs)
        for value in node.outputs:
            if value.name in self.taken:  # a name a later node of the old graph will claim
                self.g.rename(value, self.fresh(f"{self.where}.{self.count}"))
        return node.outputs

    def one(self, op: str, inputs, attrs=None) -> Value:
        return self.emit(op, inputs, attrs)[0]

    def reshape(self, v: Value, shape) -> Value:
        return v if list(v.type.shape) == list(shape) else self.one("Reshape", [v], {"shape": list(shape)})

    def slice_rows(self, v: Value, axis: int, start: int, end: int) -> Value:
        return self.one("Slice", [v], {"starts": [start], "ends": [end], "axes": [axis]})

    def direction(self, v: Value, d: int, shape) -> Value:
        """Direction ``d`` of a per-direction operand, reshaped: sliced now when constant
        (weights stay parameters however large, so later passes can re-layout them)."""
        if v in self.g.params:
            return self.add_param(f"{v.name}.d{d}", np.ascontiguousarray(self.g.params[v][d].reshape(shape)))
        return self.reshape(self.slice_rows(v, 0, d, d + 1), shape)

    def run(self) -> list[Value]:
        node, op = self.node, self.kind
        a = node.attrs
        ins = node.inputs + [None] * (12 - len(node.inputs))
        x, w, r, b, lens, h0, c0 = ins[:7]
        if a.get("layout"):
            x = self.one("Transpose", [x], {"perm": [1, 0, 2]})
            h0 = self.one("Transpose", [h0], {"perm": [1, 0, 2]}) if h0 is not None else None
            c0 = self.one("Transpose", [c0], {"perm": [1, 0, 2]}) if c0 is not None else None
        seq, batch, width = x.type.shape
        hidden, gates = r.type.shape[1 if self.quantized else 2], RECURRENT[op]
        dirs = w.type.shape[0]
        dtype = x.type.dtype.numpy
        if self.quantized:  # one range for every direction: the steps up to the longest sequence
            xq, x_scale, x_zero = self.emit("DynamicQuantizeLinear", [self.longest_steps(x, lens) if lens is not None else x])
        ys, hs, cs = [], [], []
        for d in range(dirs):
            if self.quantized:
                wd, rd = self.direction(w, d, [width, gates * hidden]), self.direction(r, d, [hidden, gates * hidden])
                w_scale, r_scale = (self.direction(ins[k], d, [ins[k].type.numel // dirs]) for k in (8, 10))
                w_zero, r_zero = (self.direction(ins[k], d, [ins[k].type.numel // dirs]) if ins[k] is not None else None for k in (9, 11))
                self.h_scale = (r_scale, r_zero)
            else:
                wd = self.direction(w, d, [gates * hidden, width])
                rd = self.direction(r, d, [gates * hidden, hidden])
            if b is not None:
                bd = self.direction(b, d, [2 * gates * hidden])
                wb, rb = self.slice_rows(bd, 0, 0, gates * hidden), self.slice_rows(bd, 0, gates * hidden, 2 * gates * hidden)
            else:
                zero = self.add_param("zero_bias", np.zeros(gates * hidden, dtype))
                wb = rb = zero
            if op != "GRU":
                wb, rb = self.one("Add", [wb, rb]), None  # both biases go into the input projection
            reverse = a["direction"] == "reverse" or d == 1
            flip = reverse and lens is not None  # each row's prefix reversed, then walked forwards
            source = xq if self.quantized else x
            xd = self.reshape(self.one("ReverseSequence", [source, lens], {"batch_axis": 1, "time_axis": 0}) if flip else source, [seq * batch, width])
            if self.quantized:
                proj = self.one("Add", [self.scaled_sums(xd, x_scale, x_zero, wd, w_scale, w_zero), wb])
            else:
                proj = self.one("Gemm", [xd, wd, wb], {"transB": 1})
            steps = self.emit("Split", [proj], {"axis": 0, "split": [batch] * seq}) if seq > 1 else [proj]
            h = self.initial(h0, d, batch, hidden, dtype)
            c = self.initial(c0, d, batch, hidden, dtype) if op == "LSTM" else None
            self.peep = None
            self.direction_index = d
            if op == "LSTM" and ins[7] is not None:  # peepholes: i, o, f weights on the cell state
                pd = self.reshape(self.slice_rows(ins[7], 0, d, d + 1), [3 * hidden])
                self.peep = [self.slice_rows(pd, 0, k * hidden, (k + 1) * hidden) for k in range(3)]
            outs: list[Value | None] = [None] * seq
            for t in (reversed(range(seq)) if reverse and not flip else range(seq)):
                if self.quantized:
                    self.h_rows = h if lens is None or t == 0 else self.where_active(t - 1, lens, batch, h)
                h_new, c_new = self.step(op, steps[t], h, c, rd, rb, hidden)
                if lens is None:
                    h, c, out = h_new, c_new, h_new
                else:  # rows past their length keep their state and output zeros
                    active = self.active(t, lens, batch)
                    h = self.one("Where", [active, h_new, h])
                    c = self.one("Where", [active, c_new, c]) if c is not None else None
                    out = self.one("Where", [active, h_new, self.add_param("zero_out", np.zeros((1, 1), dtype))])
                outs[t] = self.reshape(out, [1, 1, batch, hidden])
            y_d = self.one("Concat", outs, {"axis": 0}) if seq > 1 else outs[0]
            if flip:  # back to each row's own time order
                y_d = self.reshape(self.one("ReverseSequence", [self.reshape(y_d, [seq, batch, hidden]), lens], {"batch_axis": 1, "time_axis": 0}), [seq, 1, batch, hidden])
            ys.append(y_d)
            hs.append(self.reshape(h, [1, batch, hidden]))
            if c is not None:
                cs.append(self.reshape(c, [1, batch, hidden]))
        join = lambda vs, axis: vs[0] if len(vs) == 1 else self.one("Concat", vs, {"axis": axis})  # noqa: E731
        y, y_h = join(ys, 1), join(hs, 0)
        y_c = join(cs, 0) if cs else None
        if a.get("layout"):
            y = self.one("Transpose", [y], {"perm": [2, 0, 1, 3]})
            y_h = self.one("Transpose", [y_h], {"perm": [1, 0, 2]})
            y_c = self.one("Transpose", [y_c], {"perm": [1, 0, 2]}) if y_c is not None else None
        return [y, y_h, y_c][: len(node.outputs)]

    def active(self, t: int, lens: Value, batch: int) -> Value:
        """Which batch rows step ``t`` reaches: (batch, 1) booleans."""
        return self.reshape(self.one("Less", [self.add_param(f"t{t}", np.array(t, lens.type.dtype.numpy)), lens]), [batch, 1])

    def where_active(self, t: int, lens: Value, batch: int, h: Value) -> Value:
        """``h`` with the rows step ``t`` does not reach as zeros."""
        return self.one("Where", [self.active(t, lens, batch), h, self.add_param("zero_out", np.zeros((1, 1), h.type.dtype.numpy))])

    def longest_steps(self, x: Value, lens: Value) -> Value:
        """``x`` (seq, batch, input) with the steps past the longest sequence as zeros (those
        steps' products are never read: only the range changes)."""
        seq = x.type.shape[0]
        steps = self.add_param("steps", np.arange(seq, dtype=lens.type.dtype.numpy).reshape(seq, 1, 1))
        longest = self.one("ReduceMax", [lens], {"axes": [0], "keepdims": 1})
        zero = self.add_param("zero_in", np.zeros((1, 1, 1), x.type.dtype.numpy))
        return self.one("Where", [self.one("Less", [steps, longest]), x, zero])

    def scaled_sums(self, aq: Value, a_scale: Value, a_zero: Value, weight: Value, w_scale: Value, w_zero: Value | None) -> Value:
        """``(aq - a_zero) @ (weight - w_zero)`` in integers, times ``a_scale * w_scale`` (that
        product first: the rest then fuses into the integer product's kernel)."""
        scale = self.one("Mul", [a_scale, w_scale])
        sums = self.one("MatMulInteger", [aq, weight, a_zero, *([w_zero] if w_zero is not None else [])])
        return self.one("Mul", [self.one("Cast", [sums], {"to": "f32"}), scale])

    def recurrent(self, h: Value, rd: Value, c: Value) -> Value:
        """``c + h @ R'`` (the recurrent weights of this direction); a quantized op quantizes
        the state first, its rows that ended before the last step as zeros (``self.h_rows``)."""
        if not self.quantized:
            return self.one("Gemm", [h, rd, c], {"transB": 1})
        hq, scale, zero = self.emit("DynamicQuantizeLinear", [self.h_rows])
        return self.one("Add", [self.scaled_sums(hq, scale, zero, rd, *self.h_scale), c])

    def initial(self, state: Value | None, d: int, batch: int, hidden: int, dtype) -> Value:
        if state is None:
            return self.add_param("zero_state", np.zeros((batch, hidden), dtype))
        return self.reshape(self.slice_rows(state, 0, d, d + 1), [batch, hidden])

    def const(self, value: float) -> Value:
        return self.add_param("c", np.array(value, self.node.inputs[0].type.dtype.numpy))

    def activate(self, slot: int, x: Value, clip: bool = True) -> Value:
        """Activation ``slot`` of the current direction (ONNX's list, or the op's defaults) on
        ``x``, clipped first to [-clip, clip] when the node asks and ``clip`` is set."""
        a = self.node.attrs
        if clip and a["clip"] is not None:
            x = self.one("Clip", [x, self.const(-a["clip"]), self.const(a["clip"])])
        defaults = DEFAULT_ACTIVATIONS[self.kind]
        k = self.direction_index * len(defaults) + slot
        name = (a["activations"] or defaults * 2)[k]
        alphas, betas = list(a["activation_alpha"] or []), list(a["activation_beta"] or [])
        key = next((n for n in (*DEFAULT_ALPHA, "Relu", "Tanh", "Sigmoid", "Softsign", "Softplus") if n.lower() == name.lower()), None)
        if key is None:
            raise KilnError(f"node {self.where!r}: unknown recurrent activation {name!r}")
        alpha = alphas[k] if k < len(alphas) else DEFAULT_ALPHA.get(key, 0.0)
        beta = betas[k] if k < len(betas) else DEFAULT_BETA.get(key, 0.0)
        if key == "Affine":
            return self.one("Add", [self.one("Mul", [x, self.const(alpha)]), self.const(beta)])
        if key == "ScaledTanh":
            return self.one("Mul", [self.one("Tanh", [self.one("Mul", [x, self.const(beta)])]), self.const(alpha)])
        attrs = {"alpha": alpha, "beta": beta} if key == "HardSigmoid" else {"alpha": alpha} if key in DEFAULT_ALPHA else {}
        return self.one(key, [x], attrs)

    def step(self, op: str, gx: Value, h: Value, c: Value | None, rd: Value, rb: Value | None, hidden: int):
        """One time step: the new hidden (and cell) state."""
        if op == "RNN":
            return self.activate(0, self.one("Gemm", [h, rd, gx], {"transB": 1})), None
        if op == "LSTM":
            pre = self.recurrent(h, rd, gx)
            gi, go, gf, gc = self.emit("Split", [pre], {"axis": 1, "split": [hidden] * 4})
            if self.peep is not None:
                gi = self.one("Add", [gi, self.one("Mul", [self.peep[0], c])])
                gf = self.one("Add", [gf, self.one("Mul", [self.peep[2], c])])
            i = self.activate(0, gi)
            f = self.one("Sub", [self.const(1.0), i]) if self.node.attrs["input_forget"] else self.activate(0, gf)
            c_new = self.one("Add", [self.one("Mul", [f, c]), self.one("Mul", [i, self.activate(1, gc)])])
            if self.peep is not None:
                go = self.one("Add", [go, self.one("Mul", [self.peep[1], c_new])])
            return self.one("Mul", [self.activate(0, go), self.activate(2, c_new, clip=False)]), c_new
        # GRU: z, r, candidate
        xz, xr, xn = self.emit("Split", [gx], {"axis": 1, "split": [hidden] * 3})
        if self.node.attrs["linear_before_reset"]:
            gh = self.one("Gemm", [h, rd, rb], {"transB": 1})
            hz, hr, hn = self.emit("Split", [gh], {"axis": 1, "split": [hidden] * 3})
        else:
            r_zr, r_n = self.slice_rows(rd, 0, 0, 2 * hidden), self.slice_rows(rd, 0, 2 * hidden, 3 * hidden)
            b_zr, b_n = self.slice_rows(rb, 0, 0, 2 * hidden), self.slice_rows(rb, 0, 2 * hidden, 3 * hidden)
            hz, hr = self.emit("Split", [self.one("Gemm", [h, r_zr, b_zr], {"transB": 1})], {"axis": 1, "split": [hidden] * 2})
        z = self.activate(0, self.one("Add", [xz, hz]))
        rgate = self.activate(0, self.one("Add", [xr, hr]))
        if self.node.attrs["linear_before_reset"]:
            cand = self.one("Add", [xn, self.one("Mul", [rgate, hn])])
        else:
            cand = self.one("Add", [xn, self.one("Gemm", [self.one("Mul", [rgate, h]), r_n, b_n], {"transB": 1})])
        n = self.activate(1, cand)
        # (1 - z) * n + z * h  ==  n + z * (h - n)
        return self.one("Add", [n, self.one("Mul", [z, self.one("Sub", [h, n])])]), None


@graph_pass("decompose_rnn")
def decompose_rnn(graph: Graph) -> Graph:
    """LSTM/GRU/RNN unrolled over time into GEMMs and gate arithmetic (for kernels without RNNs)."""
    if not any(n.op.name in RECURRENT for n in graph.nodes):
        return graph
    out = Graph(graph.name)
    taken = {v.name for v in graph.values()}
    new: dict[Value, Value] = {}
    for v in graph.inputs:
        new[v] = out.add_input(v.name, v.type)
    for v, array in graph.params.items():
        new[v] = out.add_param(v.name, array)
    for node in graph.nodes:
        inputs = [new[v] if v is not None else None for v in node.inputs]
        if node.op.name in RECURRENT:
            results = _Unroller(out, _rebound(node, inputs), taken).run()
        else:
            results = out.add_node(node.op, inputs, node.attrs, name=node.name, output_names=[v.name for v in node.outputs]).outputs
        for old, value in zip(node.outputs, results):
            if value.producer is not None and value.name != old.name and not out.has_name(old.name):
                out.rename(value, old.name)
            new[old] = value
    out.outputs = [new[v] for v in graph.outputs]
    return out


def _rebound(node: Node, inputs: list[Value | None]) -> Node:
    twin = Node(node.op, inputs, node.attrs, node.name)
    twin.outputs = node.outputs
    return twin
