"""Single-thread sgemm: kiln's micro-kernel against numpy's BLAS, side by side (issue 3's 75% line).

    python benchmarks/gemm_bench.py [--size 1024] [--repeat 20] [--threads 1]

C = A @ W with W a constant (packed into panels when the module is built, as in a model),
medians over interleaved rounds so both see the same machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

THREADS = "1"
if "--threads" in sys.argv:
    THREADS = sys.argv[sys.argv.index("--threads") + 1]
for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = THREADS  # before numpy loads its BLAS

import numpy as np  # noqa: E402

import kiln  # noqa: E402
from kiln import config  # noqa: E402
from kiln.ir.dtypes import DType  # noqa: E402
from kiln.ir.graph import Graph  # noqa: E402
from kiln.ir.types import TensorType  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--threads", default="1")
    args = ap.parse_args()
    n = args.size
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n)).astype(np.float32)
    w = rng.standard_normal((n, n)).astype(np.float32)
    graph = Graph("gemm")
    x = graph.add_input("a", TensorType((n, n), DType.float32))
    graph.outputs = [graph.add_node("MatMul", [x, graph.add_param("w", w)]).outputs[0]]
    with config.override(num_threads=int(args.threads), cache_dir="off"):
        module = kiln.compile(graph, target="llvm")
    (got,) = module.run({"a": a}).values()
    np.testing.assert_allclose(got, a @ w, rtol=1e-3, atol=1e-2)
    kiln_s, numpy_s = [], []
    for _ in range(args.repeat):  # interleaved
        start = time.perf_counter()
        module.run({"a": a})
        kiln_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        np.matmul(a, w)
        numpy_s.append(time.perf_counter() - start)
    k, b = np.median(kiln_s), np.median(numpy_s)
    flops = 2 * n**3
    print(f"{n}^3 on {args.threads} thread(s): kiln {k * 1e3:.2f} ms ({flops / k / 1e9:.0f} GFLOP/s), numpy {b * 1e3:.2f} ms ({flops / b / 1e9:.0f} GFLOP/s); kiln reaches {b / k:.2f} of numpy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
