"""Run kiln bench over a set of models and write a markdown report with the ratios.

    python benchmarks/run_benchmarks.py [MODEL ...] [--repeat N] [--out benchmarks/report.md]

Defaults to the built-in light nets that the llvm target compiles today; the zoo models of the
standard set (MLP, LeNet-5, ResNet-18, LSTM, U-Net) join when the zoo lands. Ratios are taken
side by side in one run: speedup = eager_ms / kiln_ms, ort ratio = onnxruntime_ms / kiln_ms.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
from pathlib import Path

from kiln.bench import bench
from kiln.backends.llvm.target import host_cpu

DEFAULT = ["light_squeezenet", "light_resnet50", "light_shufflenet", "light_inception_v2"]


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=DEFAULT)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/report.md"))
    args = ap.parse_args()
    lines = [
        "# kiln benchmarks",
        "",
        f"CPU: {host_cpu().describe()}; Python {platform.python_version()}; medians of {args.repeat} runs after {args.warmup} warm-up runs.",
        "",
        "| model | kiln llvm ms | eager ms | onnxruntime ms | speedup vs eager | ort / kiln | compile s | outputs match |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    speedups, ort_ratios = [], []
    for model in args.models:
        rows = {r.runtime: r for r in bench(model, "llvm", ("eager", "onnxruntime"), warmup=args.warmup, repeat=args.repeat)}
        kiln, eager, ort = rows["kiln llvm"], rows["kiln eager"], rows["onnxruntime"]
        speedups.append(eager.median_ms / kiln.median_ms)
        ort_ratios.append(ort.median_ms / kiln.median_ms)
        lines.append(
            f"| {model} | {kiln.median_ms:.2f} | {eager.median_ms:.2f} | {ort.median_ms:.2f} | {speedups[-1]:.2f}x | "
            f"{ort_ratios[-1]:.2f} | {kiln.setup_s:.1f} | {'yes' if kiln.matches_eager and ort.matches_eager else 'NO'} |"
        )
        print(lines[-1], flush=True)
    lines += ["", f"Geomean speedup over eager: {geomean(speedups):.2f}x; geomean onnxruntime_ms / kiln_ms: {geomean(ort_ratios):.2f}.", ""]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
