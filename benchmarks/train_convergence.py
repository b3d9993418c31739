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
from kiln.models.datasets import bright_quadrants, converter_style_cnn, cross_entropy, shapes_segmentation, spike_sequences
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
    model = zoo.build("lstm_classifier", input_size=4, hidden_size=32, num_layers=1, num_classes=4)
    trainer = kiln.train.Trainer(model, loss="ce", optimizer=Adam(lr=1e-2), target=target)
    history = trainer.fit(spike_sequences(rng, 4096), epochs=10, batch_size=64, validation=spike_sequences(rng, 1024), progress=False)
    return "held-out accuracy", history[-1]["val_accuracy"], 0.95


def unet_shapes(target: str) -> tuple[str, float, float]:
    rng = np.random.default_rng(0)
    (x, y), (xv, yv) = shapes_segmentation(rng, 512), shapes_segmentation(rng, 128)
    trainer = kiln.train.Trainer(zoo.build("unet", in_channels=1, num_classes=3, width=8), loss="ce", optimizer=Adam(lr=3e-3), target=target)
    trainer.fit((x, y), epochs=12, batch_size=16, progress=False)
    predicted = trainer.predict(xv).argmax(axis=1)
    ious = [((predicted == c) & (yv == c)).sum() / ((predicted == c) | (yv == c)).sum() for c in range(3)]
    return "held-out mean IoU", float(np.mean(ious)), 0.9


def onnx_helper_cnn(target: str) -> tuple[str, float, float]:
    """``kiln train`` on a CNN made with onnx.helper alone; the metric is the trained model's
    cross-entropy under onnxruntime as a fraction of the initial one (the bar: it falls)."""
    import onnx
    import onnxruntime as ort

    rng = np.random.default_rng(1)
    model_proto = converter_style_cnn(rng)
    x, y = bright_quadrants(rng, 512, noise=0.5)
    with tempfile.TemporaryDirectory() as folder:
        model, data, trained = Path(folder, "cnn.onnx"), Path(folder, "data.npz"), Path(folder, "trained.onnx")
        onnx.save(model_proto, str(model))
        np.savez(data, x=x, y=y)
        subprocess.run([sys.executable, "-m", "kiln", "train", str(model), "--data", str(data), "--lr", "0.01", "--epochs", "5",
                        "--batch-size", "32", "--target", target, "-o", str(trained)], check=True, capture_output=True)  # fmt: skip

        def loss(path):
            return cross_entropy(ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0], y)

        return "loss after / before", loss(trained) / loss(model), 1.0


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
