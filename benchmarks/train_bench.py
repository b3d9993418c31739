"""One compiled training step (forward, cross-entropy, gradients, Adam) against PyTorch eager on
the CPU, side by side in one run; writes a markdown table.

    python benchmarks/train_bench.py [MODEL ...] [--target llvm] [--repeat 30] [--out benchmarks/train-report.md]

Models: MLP 784-512-256-10 at batch 64, LeNet-5 at batch 64, the 2-layer LSTM classifier
(hidden 256, 32 steps of 64 features) at batch 16, the transformer encoder classifier (2 blocks
of width 256, 4 heads, 64 steps) at batch 4 (torch's twin: nn.MultiheadAttention, whose packed
in-projection does the same products), ResNet-18 (10 classes) on 64x64 images at batch 8, and
the U-Net (width 16, 3 classes, a class per pixel) on 64x64 images at batch 4. kiln's step is the Trainer's (arrays in,
arrays out, the next parameters copied back); torch's is zero_grad, forward, loss, backward,
optimizer step. Medians after warm-up; torch uses as many threads as kiln (KILN_NUM_THREADS).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

import kiln
from kiln import config
from kiln.models import zoo
from kiln.optim import Adam

MODELS = {
    "mlp-512-256/b64": ("mlp", {"hidden": (512, 256)}, (64, 784), 10),
    "lenet5/b64": ("lenet5", {}, (64, 1, 32, 32), 10),
    "lstm-2x256/b16": ("lstm_classifier", {"hidden_size": 256, "num_layers": 2}, (16, 32, 64), 10),
    "transformer-2x256/b4": ("transformer_classifier", {}, (4, 64, 64), 10),
    "resnet18-64px/b8": ("resnet18", {"num_classes": 10}, (8, 3, 64, 64), 10),
    "unet-w16-64px/b4": ("unet", {"width": 16, "num_classes": 3}, (4, 3, 64, 64), 3),
}
PER_PIXEL = {"unet"}  # segmentation: a class index per pixel


def _torch_model(name: str, kwargs: dict):
    import torch.nn as tnn

    if name == "mlp":
        sizes = [784, *kwargs["hidden"], 10]
        layers = []
        for a, b in zip(sizes, sizes[1:]):
            layers += [tnn.Linear(a, b), tnn.ReLU()]
        return tnn.Sequential(*layers[:-1])
    if name == "lenet5":
        return tnn.Sequential(
            tnn.Conv2d(1, 6, 5), tnn.ReLU(), tnn.MaxPool2d(2), tnn.Conv2d(6, 16, 5), tnn.ReLU(), tnn.MaxPool2d(2),
            tnn.Flatten(), tnn.Linear(400, 120), tnn.ReLU(), tnn.Linear(120, 84), tnn.ReLU(), tnn.Linear(84, 10),
        )  # fmt: skip

    if name == "transformer_classifier":
        return _torch_transformer(tnn)
    if name == "resnet18":
        return _torch_resnet18(tnn, kwargs["num_classes"])
    if name == "unet":
        return _torch_unet(tnn, kwargs["width"], kwargs["num_classes"])

    class LSTMClassifier(tnn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = tnn.LSTM(64, kwargs["hidden_size"], kwargs["num_layers"], batch_first=True)
            self.fc = tnn.Linear(kwargs["hidden_size"], 10)

        def forward(self, x):
            y, _ = self.lstm(x)
            return self.fc(y[:, -1])

    return LSTMClassifier()


def _torch_transformer(tnn):
    """kiln's zoo transformer_classifier at its standard size (post-norm blocks, GELU)."""
    import torch

    class Block(tnn.Module):
        def __init__(self):
            super().__init__()
            self.attention = tnn.MultiheadAttention(256, 4, batch_first=True)
            self.norm1, self.norm2 = tnn.LayerNorm(256), tnn.LayerNorm(256)
            self.up, self.down = tnn.Linear(256, 1024), tnn.Linear(1024, 256)

        def forward(self, x):
            x = self.norm1(x + self.attention(x, x, x, need_weights=False)[0])
            return self.norm2(x + self.down(torch.nn.functional.gelu(self.up(x))))

    class TransformerClassifier(tnn.Module):
        def __init__(self):
            super().__init__()
            self.embed, self.blocks, self.fc = tnn.Linear(64, 256), tnn.Sequential(Block(), Block()), tnn.Linear(256, 10)

        def forward(self, x):
            return self.fc(self.blocks(self.embed(x)).mean(1))

    return TransformerClassifier()


def _torch_resnet18(tnn, num_classes: int):
    """kiln's zoo resnet18 (torchvision's: 7x7 stem, max pool, BasicBlocks, a 1x1 downsample)."""

    def conv_bn(cin, cout, k, stride=1):
        return [tnn.Conv2d(cin, cout, k, stride, k // 2, bias=False), tnn.BatchNorm2d(cout)]

    class Block(tnn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.body = tnn.Sequential(*conv_bn(cin, cout, 3, stride), tnn.ReLU(), *conv_bn(cout, cout, 3))
            self.skip = tnn.Sequential(*conv_bn(cin, cout, 1, stride)) if stride != 1 or cin != cout else tnn.Identity()

        def forward(self, x):
            return (self.body(x) + self.skip(x)).relu()

    layers = [*conv_bn(3, 64, 7, 2), tnn.ReLU(), tnn.MaxPool2d(3, 2, 1)]
    cin = 64
    for i in range(4):
        cout = 64 * 2**i
        layers += [Block(cin, cout, 1 if i == 0 else 2), Block(cout, cout, 1)]
        cin = cout
    return tnn.Sequential(*layers, tnn.AdaptiveAvgPool2d(1), tnn.Flatten(), tnn.Linear(cin, num_classes))


def _torch_unet(tnn, width: int, num_classes: int, depth: int = 4):
    """kiln's zoo unet: conv-BN-ReLU pairs, max pools down, 2x2 transposed convs up, skips
    concatenated."""
    import torch

    def pair(cin, cout):
        return tnn.Sequential(*[m for a, b in ((cin, cout), (cout, cout)) for m in (tnn.Conv2d(a, b, 3, 1, 1, bias=False), tnn.BatchNorm2d(b), tnn.ReLU())])

    class UNet(tnn.Module):
        def __init__(self):
            super().__init__()
            widths = [width * 2**i for i in range(depth)]
            self.down = tnn.ModuleList(pair(a, b) for a, b in zip([3, *widths], widths))
            self.bottom = pair(widths[-1], width * 2**depth)
            ups = [width * 2**depth, *reversed(widths)]
            self.up = tnn.ModuleList(tnn.ConvTranspose2d(a, b, 2, 2) for a, b in zip(ups, ups[1:]))
            self.merge = tnn.ModuleList(pair(2 * c, c) for c in ups[1:])
            self.head = tnn.Conv2d(width, num_classes, 1)

        def forward(self, x):
            skips = []
            for block in self.down:
                x = block(x)
                skips.append(x)
                x = torch.nn.functional.max_pool2d(x, 2)
            x = self.bottom(x)
            for up, merge, skip in zip(self.up, self.merge, reversed(skips)):
                x = merge(torch.cat([skip, up(x)], 1))
            return self.head(x)

    return UNet()


def _median_ms(fn, warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("models", nargs="*", metavar="MODEL", help=f"rows to run (default all): {', '.join(MODELS)}")
    ap.add_argument("--target", default="llvm")
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/train-report.md"))
    args = ap.parse_args()
    unknown = [m for m in args.models if m not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; the rows are {', '.join(MODELS)}")
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(config.num_threads())
    lines = [
        "# kiln training step vs PyTorch eager (CPU)",
        "",
        f"target {args.target}; {config.num_threads()} threads; medians of {args.repeat} steps after {args.warmup} warm-up steps; Adam, cross-entropy.",
        "",
        "| model | kiln ms | PyTorch eager ms | torch / kiln | kiln compile s |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    rng = np.random.default_rng(0)
    for label in args.models or MODELS:
        name, kwargs, shape, classes = MODELS[label]
        x = rng.standard_normal(shape).astype(np.float32)
        y = rng.integers(0, classes, (shape[0], *shape[2:]) if name in PER_PIXEL else shape[0])
        trainer = kiln.train.Trainer(zoo.build(name, **kwargs), loss="ce", optimizer=Adam(lr=1e-4), target=args.target)
        start = time.perf_counter()
        trainer.step(x, y)
        compile_s = time.perf_counter() - start
        kiln_ms = _median_ms(lambda: trainer.step(x, y), args.warmup, args.repeat)
        torch_ms = float("nan")
        if torch is not None:
            net = _torch_model(name, kwargs)
            opt = torch.optim.Adam(net.parameters(), lr=1e-4)
            tx, ty = torch.from_numpy(x), torch.from_numpy(y)

            def torch_step():
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(net(tx), ty)
                loss.backward()
                opt.step()

            torch_ms = _median_ms(torch_step, args.warmup, args.repeat)
        lines.append(f"| {label} | {kiln_ms:.2f} | {torch_ms:.2f} | {torch_ms / kiln_ms:.2f} | {compile_s:.1f} |")
        print(lines[-1], flush=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
