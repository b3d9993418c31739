"""torchvision's models as PyTorch exports them, compiled by kiln and timed against onnxruntime.

    pip install torchvision==0.28.0 pillow --no-deps    # beside torch==2.13.0 (CPU)
    python benchmarks/torchvision_models.py [NAME ...] [--repeat N] [--out benchmarks/torchvision-report.md]

kiln's own zoo (``run_benchmarks.py``) is exported by kiln; these are the graphs users bring:
torch.onnx.export's TorchScript exporter (opset 17) writes MultiheadAttention sequence-first,
SiLU as Sigmoid and Mul, GELU as Erf arithmetic, and shapes as Shape/Gather/Concat chains.
Each model is built with seeded random weights (``weights=None``), batch 1 at 224x224
(Inception v3 at 299x299), and timed by ``kiln.bench.bench`` on two threads, outputs checked
against eager. Ratios are onnxruntime_ms / kiln_ms, taken side by side in one run.

The torchvision wheel the package index here has is built for CUDA torch: under the CPU torch
its C extension registers no ``torchvision::nms``, and ``import torchvision`` fails in
``torchvision._meta_registrations``, which only registers the detection ops' fake kernels.
``import_torchvision`` then stands an empty module in for that one, and the models import.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import tempfile
import types
from pathlib import Path

from kiln import config
from kiln.backends.llvm.target import host_cpu
from kiln.bench import bench

CLASSIFIERS = [
    "squeezenet1_0", "googlenet", "inception_v3", "densenet121", "shufflenet_v2_x1_0", "mobilenet_v3_large",
    "mnasnet1_0", "efficientnet_b0", "efficientnet_v2_s", "regnet_y_400mf", "resnext50_32x4d", "convnext_tiny",
    "vit_b_16", "swin_t", "maxvit_t",
]
SEGMENTATION = ["deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"]


def import_torchvision():
    try:
        import torchvision
    except RuntimeError as error:  # the CUDA wheel under CPU torch (see the module docstring)
        if "torchvision::nms" not in str(error):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        import torchvision
    return torchvision


def export(name: str, folder: Path) -> Path:
    import torch

    torchvision = import_torchvision()
    torch.manual_seed(0)
    if name in SEGMENTATION:
        model = getattr(torchvision.models.segmentation, name)(weights=None, weights_backbone=None)
    else:
        model = getattr(torchvision.models, name)(weights=None)
    size = 299 if name == "inception_v3" else 224
    path = folder / f"{name}.onnx"
    torch.onnx.export(model.eval(), (torch.randn(1, 3, size, size),), str(path), dynamo=False, opset_version=17, input_names=["input"])
    return path


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=CLASSIFIERS + SEGMENTATION)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/torchvision-report.md"))
    args = ap.parse_args()
    import warnings

    warnings.filterwarnings("ignore")  # the TorchScript exporter's deprecation and tracer warnings
    lines = [
        "# torchvision models through torch.onnx.export",
        "",
        f"CPU: {host_cpu().describe()}; Python {platform.python_version()}; medians of {args.repeat} runs after {args.warmup} warm-up runs; compile s: a cold compile (no cache).",
        "",
        "| model | kiln llvm ms | onnxruntime ms | ort / kiln | compile s | outputs match eager |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    ratios = []
    folder = Path(tempfile.mkdtemp(prefix="kiln-torchvision-"))
    for name in args.models:
        path = export(name, folder)
        with config.override(cache_dir="off"):
            rows = {r.runtime: r for r in bench(path, "llvm", ("onnxruntime",), warmup=args.warmup, repeat=args.repeat)}
        kiln, ort = rows["kiln llvm"], rows["onnxruntime"]
        ratios.append(ort.median_ms / kiln.median_ms)
        lines.append(f"| {name} | {kiln.median_ms:.2f} | {ort.median_ms:.2f} | {ratios[-1]:.2f} | {kiln.setup_s:.1f} | {'yes' if kiln.matches_eager else 'NO'} |")
        print(lines[-1], flush=True)
        path.unlink()
    lines += ["", f"Geomean onnxruntime_ms / kiln_ms: {geomean(ratios):.2f}.", ""]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
