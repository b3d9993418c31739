"""The named pipelines, each one readable list of pass names, in the order they run."""

from __future__ import annotations

from kiln.errors import KilnError
from kiln.passes.canonicalize import CANONICALIZE
from kiln.passes.fold_batchnorm import FOLD_BATCHNORM

PIPELINES: dict[str, list[str]] = {
    # nothing: the graph as imported (what the eager oracle runs by default)
    "O0": [],
    # clean-ups that keep every op: folding, no-op removal, chain folding, CSE, DCE
    "O1": [*CANONICALIZE],
    # everything for inference: canonicalize, fold BatchNorm into conv/gemm, canonicalize again
    # (it folds the weights decompose_rnn slices), merge sums of Gemm products (gradients
    # through time) into one Gemm, store GEMM weights row-major, then fuse into groups (each
    # one kernel for the compiled backends)
    "O2": [*CANONICALIZE, *FOLD_BATCHNORM, *CANONICALIZE, "merge_gemm_sums", "pretranspose_weights", "fuse"],
}


def pipeline(name: str, layout: str = "nchw", recompute: bool = False) -> list[str]:
    """The pass names of pipeline ``name`` (``O0``, ``O1``, ``O2``; a leading ``-`` is accepted).

    ``recompute=True`` adds ``rematerialize`` to -O2 just before fusion: cheap values read
    again much later (a training step's activations) are rebuilt there, not kept.

    ``layout="nhwc"`` adds the layout passes to -O2, after BatchNorm folding (which needs the
    NCHW conv) and before the second canonicalize (which cancels the transposes they leave);
    ``layout="auto"`` converts only graphs whose convolution work is in wide layers.
    """
    from kiln.passes.layout import LAYOUT_PASSES

    key = name.lstrip("-").upper()
    try:
        passes = list(PIPELINES[key])
    except KeyError:
        raise KilnError(f"unknown pipeline {name!r}; known: {', '.join(PIPELINES)}") from None
    if layout not in LAYOUT_PASSES:
        raise KilnError(f"unknown layout {layout!r}; known: {', '.join(LAYOUT_PASSES)}")
    if recompute:
        if key != "O2":
            raise KilnError(f"recompute is part of -O2 (it runs before fusion); -{key} keeps every value where it is")
        passes.insert(passes.index("fuse"), "rematerialize")
    if LAYOUT_PASSES[layout]:
        if key != "O2":
            raise KilnError(f"layout {layout!r} is part of -O2; -{key} keeps the model's layout")
        at = len(CANONICALIZE) + len(FOLD_BATCHNORM)
        passes[at:at] = LAYOUT_PASSES[layout]
    return passes
