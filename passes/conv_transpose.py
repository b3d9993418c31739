"""conv_transpose_as_conv: a ConvTranspose with unit strides is a Conv by the same weights,
input and output channels swapped and every tap flipped, padded by ``d (k - 1) - p``.

Each output of ``ConvTranspose(x, w)`` with strides 1 sums, over the taps ``k``, the input at
``o + p - d k``; the conv by ``w'[m, c, k'] = w[c, m, K - 1 - k']`` with pads ``d (K - 1) - p``
reads the same inputs by the same weights. A training step's input gradients of its 3x3
convs are such ConvTransposes. The llvm target makes a ConvTranspose's columns for every
(output channel, tap) and sums them into the output; a conv makes its columns a band of output
rows at a time and writes each output once (a U-Net's 4x16x64x64 input gradient to 32
channels: 1.50 -> 0.64 ms). The weights' transpose and flip are nodes: constants fold, and a
training step's weights, which change every step, are a small copy.

Groups swap per group: ``(g, C/g, M/g, *K)`` becomes ``(g, M/g, C/g, *K)``. Weights computed at
run time are rewritten only where the column matrix (the batch's input positions for each
weight of a group) is at least COLUMNS_PER_WEIGHT times their size: a ResNet's 128-channel
input gradient at 8x8, batch 4, took 0.32 ms as a ConvTranspose and 0.43 as a conv plus its
0.6 MB weight copies. A ConvTranspose to fewer than MIN_OUTPUTS channels stays (each column
of the conv would feed that few outputs: LeNet-5's 16 -> 6 input gradient took 0.46 ms as a
ConvTranspose, 1.41 as a conv), as does one with a pad beyond ``d (K - 1)`` (a negative conv
pad) or channels-last.

Preconditions: before the layout passes (NCHW). Postconditions: outputs unchanged up to float
rounding (the products are summed in another order).
"""

from __future__ import annotations

import math

from kiln.ir.graph import Graph, Node
from kiln.ir.ops.nn import _spatial_attrs
from kiln.passes.autodiff import GradBuilder
from kiln.passes.base import graph_pass
from kiln.passes.rewrite import replace_node


COLUMNS_PER_WEIGHT = 8
MIN_OUTPUTS = 16  # output channels below which the conv's column rows are too few to pay


def _conv_pads(graph: Graph, node: Node) -> list[int] | None:
    """The pads of the equivalent conv, or None where it is not taken (a stride above 1,
    channels-last, a pad past the flipped kernel's reach, run-time weights as large as the
    work they would save)."""
    x, w = node.inputs[0].type, node.inputs[1].type
    nd = x.rank - 2
    strides, dilations, pads = _spatial_attrs(node.attrs, nd)
    if node.attrs["layout"] != "NCHW" or any(s != 1 for s in strides) or any(node.attrs["output_padding"] or []):
        return None
    if w.shape[1] * node.attrs["group"] < MIN_OUTPUTS:  # LeNet-5's 16 -> 6 input gradient: 0.46 -> 1.41 ms as a conv
        return None
    positions = x.shape[0] * math.prod(x.shape[2:])
    if node.inputs[1] not in graph.params and positions < COLUMNS_PER_WEIGHT * x.shape[1] // node.attrs["group"]:
        return None
    reach = [d * (k - 1) for d, k in zip(dilations, w.shape[2:])]
    flipped = [reach[i % nd] - p for i, p in enumerate(pads)]
    return flipped if all(p >= 0 for p in flipped) else None


@graph_pass("conv_transpose_as_conv")
def conv_transpose_as_conv(graph: Graph) -> Graph:
    """Unit-stride NCHW ConvTransposes as Convs (see the module docstring)."""
    for node in list(graph.nodes):
        if node.op.name != "ConvTranspose" or (pads := _conv_pads(graph, node)) is None:
            continue
        x, w, *bias = node.inputs
        nd = x.type.rank - 2
        groups = node.attrs["group"]
        c, mg, *kernel = w.type.shape
        b = GradBuilder(graph, node.name or "ConvTranspose")
        start = len(graph.nodes)
        spatial = list(range(3, 3 + nd))
        swapped = b.op("Transpose", b.reshape(w, [groups, c // groups, mg, *kernel]), perm=[0, 2, 1, *spatial])
        weight = b.reshape(b.flip(swapped, spatial), [groups * mg, c // groups, *kernel])
        _, dilations, _ = _spatial_attrs(node.attrs, nd)
        conv = b.op("Conv", x, weight, *[v for v in bias if v is not None], group=groups, dilations=list(dilations), pads=pads)
        replace_node(graph, node, [conv], start)
    return graph
