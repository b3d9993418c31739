"""The ``kiln`` command: compile, run and inspect models.

Exit status: 0 on success, 2 on usage errors (click), 1 on any other error, reported as one
line naming the file and, where there is one, the node. ``KILN_DEBUG=1`` shows tracebacks.
"""

from __future__ import annotations

import json
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Sequence

import click
import numpy as np
from rich.console import Console
from rich.table import Table

from kiln import config
from kiln.errors import KilnError, UnsupportedOpsError
from kiln.models import DEFAULT_MODEL, builtin_models

# tables stay readable when output is piped (rich would fold them at 80 columns)
out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)


# -- argument parsing -----------------------------------------------------------------------------
def _parse_shapes(ctx, param, values: Sequence[str]) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for item in values:
        name, sep, dims = item.rpartition("=")
        if not sep or not name or not re.fullmatch(r"\d+(x\d+)*|", dims):
            raise click.BadParameter(f"{item!r}: expected NAME=DIMS such as x=1x3x224x224 (or x= for a scalar)")
        shapes[name] = tuple(int(d) for d in dims.split("x")) if dims else ()
    return shapes


def _parse_inputs(ctx, param, values: Sequence[str]) -> dict[str, Path]:
    files = {}
    for item in values:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"{item!r}: expected NAME=FILE.npy")
        files[name] = Path(path)
    return files


MODEL_HELP = "an .onnx file, a .kiln artifact, or a zoo model name (see `kiln zoo`)"


def _open(model: str, target: str, shapes: dict, opts: dict | None = None, arch: str | None = None, tune: int | None = None):
    """A Module for ``model``: load an artifact, or compile an ONNX file / built-in model.

    ``opts`` holds the pass options (-O, --passes, --pass-plugin, --dump-ir, --time-passes).
    """
    import kiln
    from kiln.passes.plugins import load_plugin

    opts = opts or {}
    if model.endswith(".kiln"):
        if shapes or opts.get("opt") or opts.get("passes") or opts.get("layout", "auto") != "auto" or arch or tune:
            raise click.UsageError("--shape, -O, --passes, --layout, --arch and --tune apply to ONNX models; an artifact is already compiled")
        return kiln.load(model)
    for module in opts.get("plugins", ()):
        load_plugin(module)
    module = kiln.compile(
        model,
        target=target,
        shapes=shapes,
        pipeline=f"O{opts['opt']}" if opts.get("opt") is not None else None,
        passes=opts.get("passes", ()),
        dump_ir=opts.get("dump_ir"),
        layout=opts.get("layout", "auto"),
        arch=arch,
        tune=tune,
    )
    if opts.get("time_passes"):
        _print_pass_times(module.pass_records)
    return module


def _print_pass_times(records) -> None:
    table = Table("#", "pass", "ms", "nodes before", "nodes after", title="passes")
    for r in records:
        table.add_row(str(r.index), r.name, f"{r.seconds * 1e3:.2f}", str(r.nodes_before), str(r.nodes_after))
    total = sum(r.seconds for r in records)
    table.add_row("", "total", f"{total * 1e3:.2f}", "", "")
    err.print(table)


def _pass_options(fn):
    """-O, --passes, --pass-plugin, --dump-ir, --time-passes: shared by compile, run, inspect."""
    options = [
        click.option("-O", "opt", type=click.Choice(["0", "1", "2"]), help="pipeline: -O0 none, -O1 canonicalize, -O2 inference"),
        click.option("--passes", callback=lambda c, p, v: [s for s in (v or "").split(",") if s], metavar="A,B,C", help="passes to run after the pipeline"),
        click.option("--pass-plugin", "plugins", multiple=True, metavar="MODULE", help="import MODULE to register its passes"),
        click.option("--dump-ir", type=click.Path(file_okay=False), metavar="DIR", help="write the IR before and after each pass"),
        click.option("--time-passes", is_flag=True, help="print each pass's time and node counts"),
        click.option("--layout", type=click.Choice(["auto", "nchw", "nhwc"]), default="auto", show_default=True,
                     help="data layout of convolutions and pools (-O2): auto is the target's choice"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _opts(opt, passes, plugins, dump_ir, time_passes, layout) -> dict:
    return {"opt": opt, "passes": passes, "plugins": plugins, "dump_ir": dump_ir, "time_passes": time_passes, "layout": layout}


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise KilnError(f"{path}: no such file") from None
    except (ValueError, OSError, EOFError) as e:
        raise KilnError(f"{path}: not a readable .npy array ({e})") from None


def _safe_filename(name: str) -> str:
    """An output name as a file name that cannot leave the output folder."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")
    return safe or "output"


# -- commands ------------------------------------------------------------------------------------
@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kiln")
def cli() -> None:
    """kiln: compile ONNX models, run them, inspect their graphs."""


shape_option = click.option(
    "--shape", "shapes", multiple=True, callback=_parse_shapes, metavar="NAME=DIMS", help="bind an input's shape, e.g. x=1x3x224x224"
)
TARGET_HELP = "backend to compile for: eager, llvm, tvm-llvm, tvm-cuda"
target_option = click.option("--target", "-t", default="eager", show_default=True, help=TARGET_HELP)
# compile writes code for this CPU unless told otherwise (an eager artifact holds the graph alone)
compile_target_option = click.option("--target", "-t", default="llvm", show_default=True, help=TARGET_HELP)
arch_option = click.option("--arch", metavar="SM", help="GPU generation for tvm-cuda, e.g. sm_90 [default: the GPU present, else sm_90]")
tune_option = click.option(
    "--tune", type=click.IntRange(1), metavar="TRIALS",
    help="tvm targets: tune the kernels with MetaSchedule, TRIALS measured candidates in all (records kept in kiln's cache)",
)


@cli.command()
@click.argument("model", default=DEFAULT_MODEL)
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="artifact to write [default: MODEL.kiln]")
@compile_target_option
@arch_option
@tune_option
@shape_option
@_pass_options
def compile(model: str, output: str | None, target: str, arch: str | None, tune: int | None, shapes: dict, **pass_opts) -> None:
    """Compile MODEL (an .onnx file or a built-in name) into a .kiln artifact."""
    start = time.perf_counter()
    module = _open(model, target, shapes, _opts(**pass_opts), arch, tune)
    path = Path(output) if output else Path(Path(model).stem + ".kiln")
    module.save(path)
    g = module.graph
    out.print(
        f"compiled {model} -> {path} (target {module.target}, {len(g.nodes)} nodes, "
        f"{g.param_count:,} parameters, {path.stat().st_size:,} bytes) in {time.perf_counter() - start:.2f} s"
    )


@cli.command()
@click.argument("model", default=DEFAULT_MODEL)
@click.option("--input", "inputs", multiple=True, callback=_parse_inputs, metavar="NAME=FILE.npy", help="an input array")
@click.option("--output-dir", type=click.Path(file_okay=False), help="write one NAME.npy per output here")
@click.option("--seed", default=0, show_default=True, help="seed of the random inputs used when none are given")
@target_option
@arch_option
@tune_option
@shape_option
@_pass_options
def run(model: str, inputs: dict, output_dir: str | None, seed: int, target: str, arch: str | None, tune: int | None, shapes: dict, **pass_opts) -> None:
    """Run MODEL once and summarize its outputs (random inputs unless --input is given)."""
    start = time.perf_counter()
    module = _open(model, target, shapes, _opts(**pass_opts), arch, tune)
    built = time.perf_counter()
    if inputs:
        feeds = {name: _load_npy(path) for name, path in inputs.items()}
    else:
        from kiln.bench import random_inputs

        feeds = random_inputs(module.input_types, seed)
    results = module.run(feeds)
    done = time.perf_counter()
    how = "given" if inputs else f"random, seed {seed}"
    out.print(f"[bold]{model}[/bold] on {module.target}: {len(module.graph.nodes)} nodes; inputs ({how}):")
    for name, array in feeds.items():
        out.print(f"  {name}: {array.dtype}{list(array.shape)}")
    table = Table("output", "dtype", "shape", "min", "max", "mean")
    for name, array in results.items():
        stats = [f"{array.min():.6g}", f"{array.max():.6g}", f"{array.astype(np.float64).mean():.6g}"] if array.size else ["-"] * 3
        table.add_row(name, str(array.dtype), str(list(array.shape)), *stats)
    out.print(table)
    out.print(f"build {built - start:.2f} s, run {done - built:.3f} s")
    if output_dir:
        folder = Path(output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for name, array in results.items():
            target_path = folder / f"{_safe_filename(name)}.npy"
            np.save(target_path, array, allow_pickle=False)
            out.print(f"wrote {target_path}")


@cli.command()
@click.argument("model", default=DEFAULT_MODEL)
@click.option("--no-ir", is_flag=True, help="leave out the IR text")
@click.option("--memory", is_flag=True, help="plan the arena and report naive, planned and lower-bound bytes")
@click.option("--json", "as_json", is_flag=True, help="with --memory: print only the memory figures as JSON")
@shape_option
@_pass_options
def inspect(model: str, no_ir: bool, memory: bool, as_json: bool, shapes: dict, **pass_opts) -> None:
    """Show MODEL's graph (after -O1/-O2 if given): IR text, op histogram, parameters, unsupported ops."""
    if as_json and not memory:
        raise click.UsageError("--json goes with --memory")
    try:
        module = _open(model, "eager", shapes, _opts(**pass_opts))
    except UnsupportedOpsError as e:
        table = Table("op", "domain", "opset", "first node", title=f"{model}: ops kiln does not support")
        for op, domain, opset, node in e.missing:
            table.add_row(op, domain or "ai.onnx", str(opset), node)
        out.print(table)
        raise SystemExit(1) from None
    g = module.graph
    if memory:
        from kiln.passes.plan_memory import check_plan, plan_memory

        plan = plan_memory(g)
        check_plan(g, plan)
        figures = plan.summary()
        if as_json:
            click.echo(json.dumps(figures))
            return
    if not no_ir:
        click.echo(g.to_text(), nl=False)  # the IR verbatim: never wrapped or styled
    table = Table("op", "count", title="op histogram")
    for op, n in g.op_histogram().items():
        table.add_row(op, str(n))
    out.print(table)
    out.print(f"parameters: {g.param_count:,} elements in {len(g.params)} tensors, {g.param_bytes:,} bytes")
    for kind, values in (("inputs", g.inputs), ("outputs", g.outputs)):
        out.print(f"{kind}: " + ", ".join(f"{v.name}: {v.type}" for v in values))
    out.print("unsupported ops: none")
    if memory:
        lb = figures["lower_bound_bytes"] or 1
        naive = figures["naive_bytes"] or 1
        out.print(
            f"memory: naive {figures['naive_bytes']:,} bytes, planned arena {figures['planned_bytes']:,} bytes "
            f"({figures['planned_bytes'] / lb:.3f}x the lower bound {figures['lower_bound_bytes']:,}; "
            f"{figures['planned_bytes'] / naive:.1%} of naive)"
        )


@cli.command()
@click.argument("model", default=DEFAULT_MODEL)
@click.option("--target", "-t", default="llvm", show_default=True, help="kiln target to benchmark")
@click.option("--vs", default="eager,onnxruntime", show_default=True, help="runtimes to compare, comma separated: eager, onnxruntime, tvm")
@click.option("--warmup", default=3, show_default=True, type=click.IntRange(0))
@click.option("--repeat", default=20, show_default=True, type=click.IntRange(1))
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="also write the rows as JSON here")
@click.option("--layout", type=click.Choice(["auto", "nchw", "nhwc"]), default="auto", show_default=True, help="data layout of the compiled target's convolutions")
@click.option("--profile", "top", type=click.IntRange(1), help="time every kernel of kiln's build (KILN_PROFILE) and show the TOP costliest nodes and the time per op")
@tune_option
@shape_option
def bench(model: str, target: str, vs: str, warmup: int, repeat: int, json_out: str | None, layout: str, top: int | None, tune: int | None, shapes: dict) -> None:
    """Time MODEL compiled by kiln against eager and its peers; outputs checked against eager."""
    from rich.progress import Progress

    from kiln.bench import bench as run_bench
    from kiln.bench import rows_as_dicts

    with Progress(console=err, transient=True) as bar:

        def progress(label: str, total: int):
            task = bar.add_task(f"{label}", total=total)
            return lambda: bar.advance(task)

        rows = run_bench(model, target, [r for r in vs.split(",") if r], shapes, warmup, repeat, progress, layout, profile=top is not None, tune=tune)
    table = Table("runtime", "setup s", "median ms", "p90 ms", "samples/s", "vs eager", "max abs err", "max rel err", "matches", "arena bytes", title=f"{model}")
    for r in rows:
        table.add_row(
            r.runtime, f"{r.setup_s:.2f}", f"{r.median_ms:.3f}", f"{r.p90_ms:.3f}", f"{r.throughput:.1f}", f"{r.speedup_vs_eager:.2f}x",
            f"{r.max_abs_err:.2e}", f"{r.max_rel_err:.2e}", "yes" if r.matches_eager else "NO", f"{r.arena_bytes:,}" if r.arena_bytes is not None else "-",
        )  # fmt: skip
    out.print(table)
    if top is not None:
        _print_profile(rows[0], top)
    if json_out:
        Path(json_out).write_text(json.dumps({"model": model, "rows": rows_as_dicts(rows)}, indent=2))


def _print_profile(row, top: int) -> None:
    from kiln.bench import by_op

    if row.profile is None:
        raise click.UsageError(f"--profile needs a compiled target (llvm), not {row.runtime}")
    ms = sum(t.ms for t in row.profile)
    nodes = Table("node", "op", "ms", "share", title=f"{row.runtime}: the costliest nodes ({ms:.3f} ms a run in kernels)")
    for t in sorted(row.profile, key=lambda t: -t.ms)[: top]:
        nodes.add_row(t.node, t.op, f"{t.ms:.3f}", f"{t.share:.1%}")
    out.print(nodes)
    ops = Table("op", "nodes", "ms", "share", title="time per op")
    for op, count, op_ms, share in by_op(row.profile)[: top]:
        ops.add_row(op, str(count), f"{op_ms:.3f}", f"{share:.1%}")
    out.print(ops)


@cli.command()
@click.argument("model")
@click.option("--data", "data_path", required=True, type=click.Path(dir_okay=False), help="an .npz with x, y (and optionally x_val, y_val)")
@click.option("--loss", type=click.Choice(["ce", "nll", "mse", "l1", "bce"]), default="ce", show_default=True, help="attached to the model's output")
@click.option("--optimizer", "optimizer_name", type=click.Choice(["sgd", "adam", "adamw", "adagrad", "rmsprop"]), default="adam", show_default=True)
@click.option("--lr", type=float, default=1e-3, show_default=True)
@click.option("--momentum", type=float, default=0.0, show_default=True, help="sgd only")
@click.option("--weight-decay", type=float, default=0.0, show_default=True)
@click.option("--clip-norm", type=float, help="clip the gradients' global norm to this")
@click.option("--l1", type=click.FloatRange(0), default=0.0, show_default=True, help="add l1 * sum|w| over the parameters to the loss")
@click.option("--l2", type=click.FloatRange(0), default=0.0, show_default=True, help="add l2 * sum w^2 over the parameters to the loss")
@click.option("--recompute", is_flag=True, help="rebuild cheap activations where their gradients read them: less memory, a little more arithmetic")
@click.option("--epochs", type=click.IntRange(1), default=1, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=32, show_default=True)
@click.option("--seed", default=0, show_default=True, help="shuffling seed")
@click.option("--target", "-t", default="llvm", show_default=True, help="backend the training step is compiled for")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="write the trained model as ONNX here")
@click.option("--plot", type=click.Path(dir_okay=False), help="write the loss/accuracy curves as a PNG (needs matplotlib)")
def train(model: str, data_path: str, loss: str, optimizer_name: str, lr: float, momentum: float, weight_decay: float,
          clip_norm: float | None, l1: float, l2: float, recompute: bool, epochs: int, batch_size: int, seed: int, target: str, output: str | None, plot: str | None) -> None:  # fmt: skip
    """Train MODEL (an .onnx file or a zoo name) on DATA.npz and export the trained model."""
    from kiln import optim
    from kiln.models.zoo import ZOO, build
    from kiln.train import Trainer

    data = _load_training_data(Path(data_path))
    options = {"lr": lr, "weight_decay": weight_decay}
    if optimizer_name == "sgd":
        options["momentum"] = momentum
    optimizer = optim.OPTIMIZERS[optimizer_name](**options)
    net = build(model) if model in ZOO else model
    trainer = Trainer(net, loss=loss, optimizer=optimizer, target=target, clip_norm=clip_norm, l1=l1, l2=l2, recompute=recompute)
    validation = (data["x_val"], data["y_val"]) if "x_val" in data else None
    history = trainer.fit((data["x"], data["y"]), epochs=epochs, batch_size=min(batch_size, len(data["x"])), validation=validation, seed=seed)
    table = Table(*history[0].keys(), title=f"training {model} ({loss}, {optimizer_name}, target {target})")
    for row in history:
        table.add_row(*(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()))
    out.print(table)
    if output:
        trainer.export(output, data["x"][:1])
        out.print(f"wrote {output}")
    if plot:
        _plot_history(history, Path(plot))
        out.print(f"wrote {plot}")


def _load_training_data(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except FileNotFoundError:
        raise KilnError(f"{path}: no such file") from None
    except (ValueError, OSError) as e:
        raise KilnError(f"{path}: not a readable .npz ({e})") from None
    missing = [k for k in ("x", "y") if k not in data]
    if missing:
        raise KilnError(f"{path}: needs arrays x and y (samples on the first axis); missing {missing}, has {sorted(data)}")
    if len(data["x"]) != len(data["y"]):
        raise KilnError(f"{path}: x has {len(data['x'])} samples, y {len(data['y'])}")
    if ("x_val" in data) != ("y_val" in data):
        raise KilnError(f"{path}: x_val and y_val come together")
    if data["x"].dtype.kind == "f":
        data["x"] = data["x"].astype(np.float32)
        if "x_val" in data:
            data["x_val"] = data["x_val"].astype(np.float32)
    return data


def _plot_history(history: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise KilnError("--plot needs matplotlib: pip install 'kiln[plot]'") from None
    epochs = [row["epoch"] for row in history]
    metrics = [k for k in history[0] if k != "epoch"]
    fig, axes = plt.subplots(1, 2 if any("accuracy" in m for m in metrics) else 1, figsize=(10, 4), squeeze=False)
    for m in metrics:
        axis = axes[0][1] if "accuracy" in m else axes[0][0]
        axis.plot(epochs, [row[m] for row in history], marker="o", label=m)
    for axis in axes[0]:
        axis.set_xlabel("epoch")
        axis.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@cli.command(name="passes")
def list_passes() -> None:
    """List the registered passes and the pipelines."""
    from kiln.passes import all_passes
    from kiln.passes.pipelines import PIPELINES

    table = Table("pass", "what it does")
    for name, p in all_passes().items():
        table.add_row(name, " ".join((p.__doc__ or "").split()))
    out.print(table)
    for name, names in PIPELINES.items():
        out.print(f"-{name}: " + (", ".join(names) or "(no passes)"))


@cli.command()
def zoo() -> None:
    """List the zoo models (with parameters and FLOPs at the standard size) and the light ONNX nets."""
    from kiln.ir.cost import graph_flops
    from kiln.models.zoo import ZOO, build, zoo_graph

    table = Table("name", "model", "input", "parameters", "GFLOPs")
    for name, entry in ZOO.items():
        params = build(name).num_parameters
        flops = graph_flops(zoo_graph(name))
        label = name + (" (default)" if name == DEFAULT_MODEL else "")
        shape = "x".join(map(str, entry.input_shape))
        table.add_row(label, entry.description, shape, f"{params:,}", f"{flops / 1e9:.3f}")
    out.print(table)
    light = Table("light ONNX net", "file")
    for name, path in builtin_models().items():
        light.add_row(name, str(path))
    out.print(light)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kiln`` console script."""
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="kiln", standalone_mode=False)
    except click.exceptions.Abort:
        err.print("aborted")
        return 1
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except SystemExit as e:
        return int(e.code or 0)
    except KilnError as e:
        if config.flags().debug:
            traceback.print_exc()
        err.print(f"kiln: error: {e}", markup=False, soft_wrap=True)
        return 1
    except Exception as e:  # noqa: BLE001 - the CLI never dies with a traceback unless asked
        if config.flags().debug:
            traceback.print_exc()
        err.print(f"kiln: internal error: {type(e).__name__}: {e} (run with KILN_DEBUG=1 for the traceback)", markup=False, soft_wrap=True)
        return 1
    return 0


def console_main() -> None:
    sys.exit(main())
