"""The kiln command as a new user meets it: compile, run, inspect on light_resnet50, and
one-line errors with exit codes 1 (bad input) and 2 (usage)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from kiln.cli import main


def kiln_cmd(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "kiln", *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300
    )


def test_compile_run_inspect_light_resnet50(tmp_path, light_model, capsys):
    model = str(light_model("light_resnet50"))
    artifact = tmp_path / "resnet50.kiln"
    assert main(["compile", model, "-o", str(artifact)]) == 0
    assert artifact.exists()
    assert "(target llvm," in capsys.readouterr().out  # compiled code for this CPU by default

    x = np.random.default_rng(0).standard_normal((1, 3, 224, 224)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    outdir = tmp_path / "out"
    assert main(["run", str(artifact), "--input", f"gpu_0/data_0={tmp_path / 'x.npy'}", "--output-dir", str(outdir)]) == 0
    written = outdir / "gpu_0_softmax_1.npy"  # the '/' in the output name never makes a path
    y = np.load(written)
    assert y.shape == (1, 1000)

    import kiln

    np.testing.assert_allclose(y, kiln.compile(model).run({"gpu_0/data_0": x})["gpu_0/softmax_1"], rtol=1e-4, atol=1e-6)

    assert main(["inspect", str(artifact)]) == 0
    text = capsys.readouterr().out
    assert "Conv" in text and "op histogram" in text and "parameters:" in text and "unsupported ops: none" in text


def test_run_with_no_model_runs_the_default_on_random_inputs(capsys):
    assert main(["run"]) == 0
    out = capsys.readouterr().out
    assert "resnet18" in out and "random, seed 0" in out and "input: float32[1, 3, 224, 224]" in out and "output" in out


def test_inspect_lists_unsupported_ops(tmp_path, capsys):
    from onnx import TensorProto, helper

    node = helper.make_node("NonZero", ["x"], ["y"], name="nz")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])], [helper.make_tensor_value_info("y", TensorProto.INT64, None)])
    path = tmp_path / "nz.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    assert main(["inspect", str(path)]) == 1
    out = capsys.readouterr().out
    assert "NonZero" in out and "nz" in out


def test_shape_binding_on_the_command_line(tmp_path, capsys):
    from onnx import TensorProto, helper

    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])])
    path = tmp_path / "dyn.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    assert main(["run", str(path)]) == 1
    assert "--shape x=Nx4" in capsys.readouterr().err
    assert main(["run", str(path), "--shape", "x=3x4"]) == 0
    assert "[3, 4]" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["run", "missing.onnx"], 1, "missing.onnx: no such file"),
        (["run", "--shape", "x=1xA"], 2, "expected NAME=DIMS"),
        (["frobnicate"], 2, "No such command"),
        (["compile", "light_squeezenet", "--target", "fpga"], 1, "unknown target 'fpga'"),
    ],
)
def test_errors_are_one_line_with_the_right_exit_code(args, code, message):
    result = kiln_cmd(*args)
    assert result.returncode == code, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_truncated_model_names_the_file_and_debug_shows_the_traceback(tmp_path, light_model):
    bad = tmp_path / "cut.onnx"
    bad.write_bytes(light_model("light_squeezenet").read_bytes()[:500])
    result = kiln_cmd("run", str(bad))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cut.onnx" in lines[0] and "Traceback" not in result.stderr
    debug = kiln_cmd("run", str(bad), env={"KILN_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_bad_input_files_are_named(tmp_path):
    (tmp_path / "x.npy").write_bytes(b"not numpy")
    result = kiln_cmd("run", "light_squeezenet", "--input", f"data_0={tmp_path / 'x.npy'}")
    assert result.returncode == 1 and "x.npy: not a readable .npy array" in result.stderr
    np.save(tmp_path / "small.npy", np.zeros((1, 3, 8, 8), np.float32))
    result = kiln_cmd("run", "light_squeezenet", "--input", f"data_0={tmp_path / 'small.npy'}")
    assert result.returncode == 1 and "input 'data_0': expected shape" in result.stderr


def test_train_an_onnx_model_from_npz_and_export_it(tmp_path, capsys):
    """kiln train MODEL.onnx --data DATA.npz -o trained.onnx: the loss falls and the exported
    model (run by onnxruntime) carries the trained weights, not the initial ones."""
    import onnxruntime as ort

    import kiln
    from kiln.models import zoo

    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, 20)).astype(np.float32)
    y = (x[:, :10].sum(axis=1) > 0).astype(np.int64)  # a linearly separable two-class task
    np.savez(tmp_path / "data.npz", x=x, y=y, x_val=x[:16], y_val=y[:16])
    model = tmp_path / "mlp.onnx"
    kiln.export_onnx(zoo.build("mlp", in_features=20, hidden=(16,), num_classes=2), model, [x[:8]], input_names=["input"])
    code = main(["train", str(model), "--data", str(tmp_path / "data.npz"), "--epochs", "5", "--batch-size", "16",
                 "--lr", "0.01", "--clip-norm", "5", "--recompute", "--target", "llvm", "-o", str(tmp_path / "trained.onnx")])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "val_accuracy" in printed and "wrote" in printed
    before = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"input": x[:8]})[0]
    after = ort.InferenceSession(str(tmp_path / "trained.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x[:8]})[0]
    accuracy = lambda logits: float((logits.argmax(1) == y[:8]).mean())  # noqa: E731
    assert not np.allclose(before, after) and accuracy(after) >= accuracy(before)


def test_train_an_onnx_model_kiln_did_not_make(tmp_path):
    """kiln train on a model written with onnx.helper (which bright quadrant: 3 classes): the
    cross-entropy of the exported model, run by onnxruntime, falls well below the initial one."""
    import onnx
    import onnxruntime as ort

    from kiln.models.datasets import bright_quadrants, converter_style_cnn, cross_entropy

    rng = np.random.default_rng(1)
    onnx.save(converter_style_cnn(rng), str(tmp_path / "cnn.onnx"))
    x, y = bright_quadrants(rng, 96, noise=0.3)
    np.savez(tmp_path / "data.npz", x=x, y=y)
    result = kiln_cmd("train", str(tmp_path / "cnn.onnx"), "--data", str(tmp_path / "data.npz"), "--loss", "ce", "--optimizer", "adam",
                      "--lr", "0.02", "--epochs", "6", "--batch-size", "16", "-o", str(tmp_path / "trained.onnx"))  # fmt: skip
    assert result.returncode == 0, result.stderr

    def loss(model):
        return cross_entropy(ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0], y)

    before, after = loss(tmp_path / "cnn.onnx"), loss(tmp_path / "trained.onnx")
    assert after < 0.5 * before, (before, after)


def test_train_names_bad_data(tmp_path):
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 3), np.float32))
    result = kiln_cmd("train", "mlp", "--data", str(tmp_path / "bad.npz"))
    assert result.returncode == 1
    assert "needs arrays x and y" in result.stderr and "missing ['y']" in result.stderr


@pytest.mark.skipif(__import__("kiln.backends.tvm", fromlist=["x"]).cuda_available(), reason="checks what a machine without a GPU does")
def test_a_cuda_artifact_compiles_here_and_running_it_names_the_missing_gpu(tmp_path, capsys):
    """Issue 7's split: compile for the GPU machine on one without a GPU, run it there."""
    artifact = tmp_path / "mlp.kiln"
    assert main(["compile", "mlp", "-t", "tvm-cuda", "--arch", "sm_90", "-o", str(artifact)]) == 0
    assert "(target tvm-cuda," in capsys.readouterr().out
    assert main(["inspect", str(artifact)]) == 0
    capsys.readouterr()
    assert main(["run", str(artifact)]) == 1
    assert "no CUDA device is visible" in capsys.readouterr().err
