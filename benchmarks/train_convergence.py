"""The full convergence runs behind the short training tests: LeNet-5 on scikit-learn's digits,
the LSTM classifier on a spike-detection sequence task, a small U-Net on synthetic shapes, and
a CNN written with onnx.helper trained through ``kiln train``.

    python benchmarks/train_convergence.py [--target llvm] [--out benchmarks/convergence-report.md]

Each run reports its held-out metric against the bar the training issue sets (97% accuracy,
95% accuracy, mean IoU 0.9, a falling loss) and its wall time.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import kiln
from kiln.models import zoo
from kiln.optim import Adam


def lenet_digits(target: str) -> tuple[str, float, float]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = np.kron(digits.images.astype(np.float32) / 16.0, np.ones((4, 4), np.float32))[:, None]
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], digits.target[order]
    split = int(0.8 * len(x))
    trainer = kiln.train.Trainer(zoo.build("lenet5"), loss="ce", optimizer=Adam(lr=2e-3), target=target)
    history = trainer.fit((x[:split], y[:split]), epochs=12, batch_size=64, validation=(x[split:], y[split:]), progress=False)
    return "held-out accuracy", history[-1]["val_accuracy"], 0.97


def lstm_spikes(target: str) -> tuple[str, float, float]:
    rng = np.random.default_rng(0)

    def data(n):
        x = (0.3 * rng.standard_normal((n, 12, 4))).astype(np.float32)
        y = rng.integers(0, 4, n)
        x[np.arange(n), rng.integers(0, 12, n), y] += 2.0
        return x, y

    model = zoo.build("lstm_classifier", input_size=4, hidden_size=32, num_layers=1, num_classes=4)
    trainer = kiln.train.Trainer(model, loss="ce", optimizer=Adam(lr=1e-2), target=target)
    history = trainer.fit(data(4096), epochs=10, batch_size=64, validation=data(1024), progress=False)
    return "held-out accuracy", history[-1]["val_accuracy"], 0.95


def unet_shapes(target: str) -> tuple[str, float, float]:
    rng = np.random.default_rng(0)

    def shapes(n, size=32):
        x = np.zeros((n, 1, size, size), np.float32)
        y = np.zeros((n, size, size), np.int64)
        yy, xx = np.mgrid[:size, :size]
        for i in range(n):
            for cls in (1, 2):
                r = rng.integers(4, 8)
                cy, cx = rng.integers(r, size - r, 2)
                inside = (np.abs(yy - cy) <= r) & (np.abs(xx - cx) <= r) if cls == 1 else (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
                y[i][inside] = cls
        x[:, 0] = (y > 0) + 0.5 * (y == 2) + 0.3 * rng.standard_normal((n, size, size))
        return x, y

    (x, y), (xv, yv) = shapes(512), shapes(128)
    trainer = kiln.train.Trainer(zoo.build("unet", in_channels=1, num_classes=3, width=8), loss="ce", optimizer=Adam(lr=3e-3), target=target)
    trainer.fit((x, y), epochs=12, batch_size=16, progress=False)
    predicted = trainer.predict(xv).argmax(axis=1)
    ious = [((predicted == c) & (yv == c)).sum() / ((predicted == c) | (yv == c)).sum() for c in range(3)]
    return "held-out mean IoU", float(np.mean(ious)), 0.9


def onnx_helper_cnn(target: str) -> tuple[str, float, float]:
    """``kiln train`` on a CNN made with onnx.helper alone; the metric is the trained model's
    cross-entropy under onnxruntime as a fraction of the initial one (the bar: it falls)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper, save

    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(np.asarray(a, np.float32), n) for n, a in [
        ("conv.w", rng.normal(0, 0.4, (4, 1, 3, 3))), ("conv.b", np.zeros(4)), ("bn.scale", np.ones(4)), ("bn.bias", np.zeros(4)),
        ("bn.mean", np.zeros(4)), ("bn.var", np.ones(4)), ("fc.w", rng.normal(0, 0.2, (3, 64))), ("fc.b", np.zeros(3))]]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["image", "conv.w", "conv.b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["n"]),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(nodes, "handwritten", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 1, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])], inits)  # fmt: skip
    y = rng.integers(0, 3, 512)
    x = (0.5 * rng.standard_normal((512, 1, 8, 8))).astype(np.float32)
    for i, cls in enumerate(y):
        x[i, 0, (cls // 2) * 4 : (cls // 2) * 4 + 4, (cls % 2) * 4 : (cls % 2) * 4 + 4] += 1.0
    with tempfile.TemporaryDirectory() as folder:
        model, data, trained = Path(folder, "cnn.onnx"), Path(folder, "data.npz"), Path(folder, "trained.onnx")
        save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="onnx.helper"), str(model))
        np.savez(data, x=x, y=y)
        subprocess.run([sys.executable, "-m", "kiln", "train", str(model), "--data", str(data), "--lr", "0.01", "--epochs", "5",
                        "--batch-size", "32", "--target", target, "-o", str(trained)], check=True, capture_output=True)  # fmt: skip

        def cross_entropy(path):
            logits = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0].astype(np.float64)
            logits -= logits.max(axis=1, keepdims=True)
            return float(np.mean(np.log(np.exp(logits).sum(axis=1)) - logits[np.arange(len(y)), y]))

        return "loss after / before", cross_entropy(trained) / cross_entropy(model), 1.0


RUNS = {"LeNet-5, digits": lenet_digits, "LSTM, spike task": lstm_spikes, "U-Net, shapes": unet_shapes, "onnx.helper CNN via kiln train": onnx_helper_cnn}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="llvm")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/convergence-report.md"))
    args = ap.parse_args()
    lines = ["# kiln training convergence", "", f"target {args.target}", "", "| run | metric | value | bar | met | wall s |", "| --- | --- | ---: | ---: | --- | ---: |"]
    for label, run in RUNS.items():
        start = time.perf_counter()
        metric, value, bar = run(args.target)
        met = value < bar if metric.startswith("loss") else value >= bar
        lines.append(f"| {label} | {metric} | {value:.4f} | {'<' if metric.startswith('loss') else '>='} {bar} | {'yes' if met else 'NO'} | {time.perf_counter() - start:.1f} |")
        print(lines[-1], flush=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
