"""Run the ONNX backend suite outside pytest and summarize why cases fail.

    python tests/conformance/report.py [--target eager] [--kind node] [--out failures.tsv] [--jobs N]

Prints pass/fail counts per kind and groups failures by error message, so the expectations
file's reasons can be written from evidence. (pytest runs the suite itself; this is for people.)
"""

from __future__ import annotations

import argparse
import collections
import sys
import warnings
from concurrent.futures import ProcessPoolExecutor

from onnx.backend.test.loader import load_model_tests
from onnx.backend.test.runner import Runner

from suite import case_data, case_model

from kiln.runtime.onnx_backend import KilnBackend


def run_case(case, target: str) -> str | None:
    try:
        rep = KilnBackend.prepare(case_model(case), "CPU", target=target)
        for inputs, expected in case_data(case):
            outputs = rep.run(inputs)
            Runner.assert_similar_outputs(expected, outputs, rtol=case.rtol, atol=case.atol)
    except AssertionError as err:
        return "wrong values: " + str(err).strip().splitlines()[0][:150]
    except Exception as err:  # noqa: BLE001 - a report wants every failure
        return f"{type(err).__name__}: " + str(err).strip().splitlines()[0][:200]
    return None


SEQUENCE_OPS = ("Sequence", "Optional", "SplitToSequence", "ConcatFromSequence")
STRING_OPS = ("String", "RegexFullMatch", "LabelEncoder", "TfIdfVectorizer")
RANDOM_OPS = ("RandomUniformLike", "RandomNormalLike", "RandomUniform", "RandomNormal", "Bernoulli", "Multinomial")
DATA_DEPENDENT = ("NonZero", "Unique", "Compress", "NonMaxSuppression")
TRAINING_OPS = ("Adagrad", "Adam", "Momentum", "Gradient")


def reason(error: str) -> str:
    """A reason for the expectations file, from a case's error message."""
    if "unsupported op(s): " in error:
        ops = error.split("unsupported op(s): ", 1)[1].split(", ")
        if any(op.startswith(SEQUENCE_OPS) for op in ops):
            return "sequence/optional values: kiln's IR holds tensors only"
        if any(op.startswith(STRING_OPS) for op in ops):
            return "string ops: strings are not a kiln dtype"
        if any(op in RANDOM_OPS for op in ops):
            return f"{', '.join(ops)}: random draws cannot match the reference's"
        if any(op in DATA_DEPENDENT for op in ops):
            return f"{', '.join(ops)}: output shape depends on tensor data; kiln compiles static shapes"
        if any(op in TRAINING_OPS for op in ops):
            return f"{', '.join(ops)}: ai.onnx.preview.training; kiln trains through its own autodiff"
        return f"{', '.join(ops)}: not in kiln's op set yet"
    if "has no kernels yet for: " in error:
        return f"llvm: no kernel yet for {error.split('has no kernels yet for: ', 1)[1]}"
    if "no TVM lowering yet for " in error:
        return f"tvm: no lowering yet for {error.split('no TVM lowering yet for ', 1)[1]}"
    if "has no LLVM kernel yet" in error:
        return "llvm: " + error.split(": ", 2)[-1]
    if "element type " in error:
        dtype = error.split("element type ", 1)[1].split()[0]
        return f"element type {dtype} is not a kiln dtype"
    if "is not a tensor" in error or "array element with a sequence" in error:
        return "sequence/optional values: kiln's IR holds tensors only"
    return error.replace(":", " -")[:160]


def _run_kind_slice(args: tuple[str, str, int, int]) -> dict[str, str]:
    """Failures among every ``jobs``-th case of ``kind`` from ``start`` (one worker's share)."""
    kind, target, start, jobs = args
    warnings.simplefilter("ignore")
    cases = [c for c in load_model_tests(kind=kind) if c.url is None][start::jobs]
    return {case.name: err for case in cases if (err := run_case(case, target))}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", default="eager")
    ap.add_argument("--kind", action="append", help="node, simple, pytorch-converted, pytorch-operator")
    ap.add_argument("--out", help="write 'case<TAB>error' lines here")
    ap.add_argument("--write-expectations", metavar="PATH", help="write every failure as 'case: reason' (review it!)")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    kinds = args.kind or ["node", "simple", "pytorch-converted", "pytorch-operator"]
    failures: dict[str, str] = {}
    for kind in kinds:
        total = len([c for c in load_model_tests(kind=kind) if c.url is None])
        shares = [(kind, args.target, start, args.jobs) for start in range(args.jobs)]
        with ProcessPoolExecutor(args.jobs) as pool:
            found = [f for share in pool.map(_run_kind_slice, shares) for f in share.items()]
        failures.update(found)
        print(f"{kind}: {total - len(found)}/{total} pass", flush=True)
    groups = collections.Counter(e.split(":")[0] + ":" + e.split(":")[1][:60] if ":" in e else e for e in failures.values())
    for msg, n in groups.most_common(40):
        print(f"{n:5d}  {msg}")
    if args.write_expectations:
        with open(args.write_expectations, "w") as fh:
            fh.write(f"# ONNX backend-suite cases that fail on target {args.target}, each with its reason.\n")
            fh.write("# A listed case that starts passing fails the run: delete its line.\n")
            # the light model-zoo nets run only under pytest (they need generated inputs)
            for name, err in sorted(failures.items()):
                why = reason(err)
                if "fp16" in name and err.startswith("wrong values"):
                    why = "float16: rounding differs from the reference's float16 arithmetic beyond rtol 1e-3"
                fh.write(f"{name}: {why}\n")
    if args.out:
        with open(args.out, "w") as fh:
            # the light model-zoo nets run only under pytest (they need generated inputs)
            for name, err in sorted(failures.items()):
                fh.write(f"{name}\t{err}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
