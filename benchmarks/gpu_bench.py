"""GPU benchmark: kiln's tvm-cuda target against PyTorch eager on CUDA and TVM's own ONNX importer
with its default (dlight) build, side by side in one run; writes a markdown table.

    python benchmarks/gpu_bench.py [--models resnet50/b1,...] [--repeat 50] [--tune TRIALS] [--out gpu-report.md]

Every runtime gets its inputs already on the GPU and is timed to completion (device sync), as
medians of ``--repeat`` runs after ``--warmup``; each output is checked against kiln eager on
the CPU (max abs error). Models are zoo models with seeded weights, exported to ONNX first.
``--tune TRIALS`` adds kiln built with MetaSchedule tuning (that many trials per model; needs the
tune extra) as a column of its own.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import kiln
from kiln.models import zoo

sys.path.insert(0, str(Path(__file__).parent))
from torch_eager import torch_runner  # noqa: E402

MODELS = {
    "resnet50/b1": ("resnet50", {}, (1, 3, 224, 224)),
    "resnet50/b32": ("resnet50", {}, (32, 3, 224, 224)),
    "unet-w32/128": ("unet", {"width": 32}, (1, 3, 128, 128)),
    "lstm-2x256/b16": ("lstm_classifier", {"hidden_size": 256, "num_layers": 2}, (16, 32, 64)),
}


def _median_ms(run, sync, warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        run()
    sync()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench_model(label: str, folder: Path, warmup: int, repeat: int, arch: str | None, tune: int | None = None) -> dict:
    import torch
    import tvm

    name, kwargs, shape = MODELS[label]
    path = folder / f"{label.replace('/', '_')}.onnx"
    kiln.export_onnx(zoo.build(name, **kwargs), path, [np.zeros(shape, np.float32)], input_names=["input"])
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    want = kiln.compile(str(path), pipeline="O2", target="eager").run({"input": x})
    (out_name,) = want
    row = {"model": label}

    start = time.perf_counter()
    module = kiln.compile(str(path), target="tvm-cuda", arch=arch)
    row["kiln compile s"] = time.perf_counter() - start
    ex = module.executable
    dev = ex.device
    on_gpu = ex.to_device(x)
    row["kiln ms"] = _median_ms(lambda: ex.run_device([on_gpu]), dev.sync, warmup, repeat)
    row["kiln err"] = float(np.abs(ex.run([x])[0] - want[out_name]).max())
    if tune:
        start = time.perf_counter()
        tuned = kiln.compile(str(path), target="tvm-cuda", arch=arch, tune=tune).executable
        row["tune s"] = time.perf_counter() - start
        row["tuned ms"] = _median_ms(lambda: tuned.run_device([on_gpu]), dev.sync, warmup, repeat)
        row["kiln err"] = max(row["kiln err"], float(np.abs(tuned.run([x])[0] - want[out_name]).max()))

    graph = kiln.compile(str(path), pipeline="O0").graph
    torch_run = torch_runner(graph, "cuda")
    feeds = {"input": torch.from_numpy(x).cuda()}
    row["torch ms"] = _median_ms(lambda: torch_run(feeds), torch.cuda.synchronize, warmup, repeat)
    row["torch err"] = float(np.abs(torch_run(feeds)[out_name].cpu().numpy() - want[out_name]).max())

    try:
        from tvm import relax
        from tvm.relax.frontend.onnx import from_onnx
        import onnx

        start = time.perf_counter()
        target = tvm.target.Target({"kind": "cuda", "arch": arch or "sm_90", "max_shared_memory_per_block": 49152})
        built = tvm.compile(from_onnx(onnx.load(path), shape_dict={"input": list(shape)}, keep_params_in_input=False), target=target)
        row["tvm compile s"] = time.perf_counter() - start
        vm = relax.VirtualMachine(built, tvm.cuda(0))
        tvm_x = tvm.runtime.tensor(x, tvm.cuda(0))
        row["tvm ms"] = _median_ms(lambda: vm["main"](tvm_x), tvm.cuda(0).sync, warmup, repeat)
        result = vm["main"](tvm_x)
        result = result[0] if not hasattr(result, "numpy") else result
        row["tvm err"] = float(np.abs(result.numpy() - want[out_name]).max())
    except Exception as err:  # noqa: BLE001 - report the peer's failure, keep the row
        row["tvm error"] = str(err).strip().splitlines()[0][:120]
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--arch", default=None)
    ap.add_argument("--tune", type=int, default=None, metavar="TRIALS", help="also time kiln tuned with MetaSchedule")
    ap.add_argument("--out", type=Path, default=Path("gpu-report.md"))
    args = ap.parse_args()
    import torch

    folder = Path(tempfile.mkdtemp(prefix="kiln-gpu-bench-"))
    lines = [
        "# kiln on the GPU",
        "",
        f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}; medians of {args.repeat} runs after {args.warmup} warm-up runs; inputs on the device, timed to a device sync.",
        "",
        "| model | kiln tvm-cuda ms | PyTorch eager ms | TVM default ms | torch / kiln | TVM / kiln | kiln compile s | TVM compile s"
        f"{f' | kiln --tune {args.tune} ms | torch / tuned | tuning s' if args.tune else ''} | max abs err kiln / torch / TVM |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: | ---: | ---: |" if args.tune else "") + " --- |",
    ]
    for label in args.models.split(","):
        try:
            r = bench_model(label, folder, args.warmup, args.repeat, args.arch, args.tune)
        except Exception as err:  # noqa: BLE001 - one failing model must not hide the others
            lines.append(f"| {label} | failed: {str(err).strip().splitlines()[0][:150]} |")
            print(lines[-1], flush=True)
            continue
        tvm_ms = r.get("tvm ms", float("nan"))
        lines.append(
            f"| {label} | {r['kiln ms']:.3f} | {r['torch ms']:.3f} | {tvm_ms:.3f} | {r['torch ms'] / r['kiln ms']:.2f} | "
            f"{tvm_ms / r['kiln ms']:.2f} | {r['kiln compile s']:.1f} | {r.get('tvm compile s', float('nan')):.1f} | "
            + (f"{r['tuned ms']:.3f} | {r['torch ms'] / r['tuned ms']:.2f} | {r['tune s']:.0f} | " if args.tune else "")
            + f"{r['kiln err']:.1e} / {r['torch err']:.1e} / {r.get('tvm err', float('nan')):.1e} {r.get('tvm error', '')} |"
        )
        print(lines[-1], flush=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
