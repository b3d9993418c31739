"""Run kiln bench over a set of models and write a markdown report with the ratios.

    python benchmarks/run_benchmarks.py [MODEL ...] [--repeat N] [--out benchmarks/report.md]

Defaults to the standard set: MLP 784-512-256-10 (batch 64), LeNet-5 (batch 64), ResNet-18
(batch 1, 224x224), ResNet-50 (batch 1, 224x224), MobileNetV2 (batch 1, 224x224), a 2-layer LSTM
(hidden 256, 32 steps, batch 16) and a GRU of the same size, a transformer encoder (2 blocks of
width 256, 4 heads, 64 steps, batch 4), a U-Net (width 32, 1x3x128x128), FCN-8s and DeepLabv3 (batch 1,
224x224: transposed and dilated convolutions), the MLP, ResNet-18 and MobileNetV2 quantized
to int8 (onnxruntime's quantize_static: QDQ, per-channel int8 weights, uint8 activations), and
the MLP, the LSTM and the transformer quantized dynamically (onnxruntime's quantize_dynamic: int8 weights, each
product's activations quantized as it runs; the LSTM becomes DynamicQuantizeLSTM). Zoo models are built with seeded weights and exported to
ONNX first, so every runtime (onnxruntime too) runs the same file. Ratios are taken side by side
in one run: speedup = eager_ms / kiln_ms, ort ratio = onnxruntime_ms / kiln_ms.
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
from pathlib import Path

import tempfile

import numpy as np

import kiln
from kiln import config
from kiln.bench import bench
from kiln.backends.llvm.target import host_cpu
from kiln.models import zoo

# name -> (zoo builder, its arguments, input shape); plain names are light nets or files
STANDARD = {
    "mlp-512-256/b64": ("mlp", {"hidden": (512, 256)}, (64, 784)),
    "lenet5/b64": ("lenet5", {}, (64, 1, 32, 32)),
    "resnet18/b1": ("resnet18", {}, (1, 3, 224, 224)),
    "resnet50/b1": ("resnet50", {}, (1, 3, 224, 224)),
    "mobilenet_v2/b1": ("mobilenet_v2", {}, (1, 3, 224, 224)),
    "lstm-2x256/b16": ("lstm_classifier", {"hidden_size": 256, "num_layers": 2}, (16, 32, 64)),
    "gru-2x256/b16": ("gru_classifier", {"hidden_size": 256, "num_layers": 2}, (16, 32, 64)),
    "transformer-2x256/b4": ("transformer_classifier", {}, (4, 64, 64)),
    "unet-w32/128": ("unet", {"width": 32}, (1, 3, 128, 128)),
    "fcn8s/b1": ("fcn", {}, (1, 3, 224, 224)),
    "deeplabv3/b1": ("deeplabv3", {}, (1, 3, 224, 224)),
    "mlp-int8/b64": ("mlp", {"hidden": (512, 256)}, (64, 784)),
    "resnet18-int8/b1": ("resnet18", {}, (1, 3, 224, 224)),
    "mobilenet_v2-int8/b1": ("mobilenet_v2", {}, (1, 3, 224, 224)),
    "mlp-dynamic-int8/b64": ("mlp", {"hidden": (512, 256)}, (64, 784)),
    "lstm-dynamic-int8/b16": ("lstm_classifier", {"hidden_size": 256, "num_layers": 2}, (16, 32, 64)),
    "transformer-dynamic-int8/b4": ("transformer_classifier", {}, (4, 64, 64)),
}
INT8 = {"mlp-int8/b64", "resnet18-int8/b1", "mobilenet_v2-int8/b1"}  # quantized after export (``quantized``)
DYNAMIC_INT8 = {"mlp-dynamic-int8/b64", "lstm-dynamic-int8/b16", "transformer-dynamic-int8/b4"}  # ... or ``dynamically_quantized``
INT8_NOTE = (
    "int8 models: kiln (on AVX-512 VNNI) and onnxruntime sum exactly in integers where eager sums dequantized floats, "
    "so an output next to a rounding boundary can differ from eager's by one quantization step, and 'outputs match' reads NO. "
    "The dynamically quantized LSTM quantizes its state every step, so such a step moves the steps after it; onnxruntime on "
    "two threads also quantizes each thread's batch rows apart (kiln and eager quantize them together, as onnxruntime on one)."
)


def model_file(label: str, folder: Path) -> str:
    """A path bench can open: the zoo model exported to ONNX, or the name as given."""
    spec = STANDARD.get(label)
    if spec is None:
        return label
    name, kwargs, shape = spec
    path = folder / f"{name}.onnx"
    kiln.export_onnx(zoo.build(name, **kwargs), path, [np.zeros(shape, np.float32)], input_names=["input"])
    if label in DYNAMIC_INT8:
        return dynamically_quantized(path)
    return quantized(path, shape) if label in INT8 else str(path)


def quantized(path: Path, shape) -> str:
    """``path`` quantized the way onnxruntime's tools do for CPU inference: BatchNorm folded
    (``quant_pre_process``), then QDQ with per-channel int8 weights and uint8 activations,
    calibrated on 8 seeded normal inputs."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Inputs(CalibrationDataReader):
        def __init__(self):
            self.feeds = iter({"input": np.random.default_rng(i).standard_normal(shape).astype(np.float32)} for i in range(8))

        def get_next(self):
            return next(self.feeds, None)

    prepared, out = path.with_suffix(".pre.onnx"), path.with_suffix(".int8.onnx")
    quant_pre_process(str(path), str(prepared), skip_symbolic_shape=True)
    quantize_static(str(prepared), str(out), Inputs(), quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return str(out)


def dynamically_quantized(path: Path) -> str:
    """``path`` through onnxruntime's ``quantize_dynamic`` with int8 weights (its default)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = path.with_suffix(".dynamic-int8.onnx")
    quantize_dynamic(str(path), str(out), weight_type=QuantType.QInt8)
    return str(out)


def geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", default=list(STANDARD))
    ap.add_argument("--layout", default="auto", choices=["auto", "nchw", "nhwc"])
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/report.md"))
    args = ap.parse_args()
    lines = [
        "# kiln benchmarks",
        "",
        f"CPU: {host_cpu().describe()}; Python {platform.python_version()}; medians of {args.repeat} runs after {args.warmup} warm-up runs; layout {args.layout}; compile s: a cold compile (no cache).",
        "",
        "| model | kiln llvm ms | eager ms | onnxruntime ms | speedup vs eager | ort / kiln | compile s | outputs match |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    speedups, ort_ratios = [], []
    folder = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    for model in args.models:
        path = model_file(model, folder)
        with config.override(cache_dir="off"):  # the compile column times a compile, not a cache hit
            rows = {r.runtime: r for r in bench(path, "llvm", ("eager", "onnxruntime"), warmup=args.warmup, repeat=args.repeat, layout=args.layout)}
        kiln, eager, ort = rows["kiln llvm"], rows["kiln eager"], rows["onnxruntime"]
        speedups.append(eager.median_ms / kiln.median_ms)
        ort_ratios.append(ort.median_ms / kiln.median_ms)
        lines.append(
            f"| {model} | {kiln.median_ms:.2f} | {eager.median_ms:.2f} | {ort.median_ms:.2f} | {speedups[-1]:.2f}x | "
            f"{ort_ratios[-1]:.2f} | {kiln.setup_s:.1f} | {'yes' if kiln.matches_eager and ort.matches_eager else 'NO'} |"
        )
        print(lines[-1], flush=True)
    lines += ["", f"Geomean speedup over eager: {geomean(speedups):.2f}x; geomean onnxruntime_ms / kiln_ms: {geomean(ort_ratios):.2f}.", ""]
    if (INT8 | DYNAMIC_INT8) & set(args.models):
        lines += [INT8_NOTE, ""]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
