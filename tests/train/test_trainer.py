"""Training: the compiled step gives the same parameters on every target, models learn, and
checkpoints and exports carry the trained weights."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import kiln
from kiln.backends.tvm import cuda_available
from kiln.errors import KilnError
from kiln.models import zoo
from kiln.models.datasets import shapes_segmentation, spike_sequences
from kiln.optim import SGD, Adam, AdamW, AdaGrad, RMSProp


GPU = [pytest.mark.gpu, pytest.mark.skipif(not cuda_available(), reason="no CUDA device visible")]


def _batch(shape, classes, seed=0, per_pixel=False):
    """Inputs and class indices: one per sample, or one per pixel (segmentation)."""
    rng = np.random.default_rng(seed)
    labels = (shape[0], *shape[2:]) if per_pixel else shape[0]
    return rng.standard_normal(shape).astype(np.float32), rng.integers(0, classes, labels)


MODELS = {
    "mlp": ({"hidden": (32,)}, (16, 784), 10),
    "lenet5": ({}, (8, 1, 32, 32), 10),
    "resnet_small": ({"width": 4, "layers": (1, 1, 1, 1), "num_classes": 5}, (8, 3, 64, 64), 5),
    "lstm_classifier": ({"input_size": 4, "hidden_size": 16, "num_layers": 1, "num_classes": 4}, (8, 6, 4), 4),
    "unet": ({"in_channels": 1, "num_classes": 3, "width": 4, "depth": 2}, (4, 1, 16, 16), 3),
}


@pytest.mark.parametrize("name", MODELS)
def test_five_compiled_steps_give_eager_parameters(name):
    """5 SGD-with-momentum steps: llvm's parameters equal eager's (rtol 1e-4). (The ResNet's
    last BatchNorms need a few samples per channel: over 4 values, float32 summation order is
    amplified step after step until the two runs part.)"""
    kwargs, shape, classes = MODELS[name]
    builder = "resnet18" if name.startswith("resnet") else name
    x, y = _batch(shape, classes, per_pixel=name == "unet")
    results = {}
    for target in ("eager", "llvm"):
        trainer = kiln.train.Trainer(zoo.build(builder, **kwargs), loss="ce", optimizer=SGD(lr=0.02, momentum=0.9), target=target)
        losses = [trainer.step(x, y) for _ in range(5)]
        assert losses[-1] < losses[0], f"{name} on {target}: loss did not fall {losses}"
        results[target] = trainer.values
    for key, want in results["eager"].items():
        # rtol 1e-4 per element; elements near a cancellation (a velocity summing gradients of
        # both signs) are held to 1e-5 of the tensor's largest value instead
        atol = max(1e-6, 1e-5 * float(np.abs(want).max(initial=0.0)))
        np.testing.assert_allclose(results["llvm"][key], want, rtol=1e-4, atol=atol, err_msg=f"{name}: {key}")


@pytest.mark.parametrize("optimizer", [SGD(lr=0.1), SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3), Adam(lr=1e-2), AdamW(lr=1e-2), AdaGrad(lr=0.1), RMSProp(lr=1e-2)], ids=repr)
def test_every_optimizer_lowers_the_loss_identically_on_tvm(optimizer):
    x, y = _batch((16, 784), 10, 1)
    results = {}
    for target in ("eager", "tvm-llvm"):
        trainer = kiln.train.Trainer(zoo.build("mlp", hidden=(16,)), loss="ce", optimizer=optimizer, target=target)
        losses = [trainer.step(x, y) for _ in range(4)]
        assert losses[-1] < losses[0]
        results[target] = losses
        if target == "tvm-llvm":  # the carried values stay TVM tensors between steps
            assert not any(isinstance(v, np.ndarray) for v in trainer.values.values())
    np.testing.assert_allclose(results["tvm-llvm"], results["eager"], rtol=1e-4)


def test_optimizer_updates_match_their_formulas():
    """One Adam step on a known gradient: p - lr * m_hat / (sqrt(v_hat) + eps)."""
    from kiln.ir import parse_graph

    graph = parse_graph("graph g(%x: f32[2,3]) {\n param %w: f32[3,1] = dense<sha256:" + _digest() + ">\n %y: f32[2,1] = MatMul(%x, %w)\n return %y\n}", {"w": W0})
    x = np.array([[1, 2, 3], [4, 5, 6]], np.float32)
    t = np.array([[1.0], [-1.0]], np.float32)
    trainer = kiln.train.Trainer(graph, loss="mse", optimizer=Adam(lr=0.1), input_name="x", target="eager")
    trainer.step(x, t)
    grad = 2 * x.T @ (x @ W0 - t) / 2
    m, v = 0.1 * grad, 0.001 * grad**2
    want = W0 - 0.1 * (m / 0.1) / (np.sqrt(v / 0.001) + 1e-8)
    np.testing.assert_allclose(trainer.values["w"], want, rtol=1e-5, atol=1e-6)


W0 = np.array([[0.5], [-0.25], [0.1]], np.float32)


def _digest():
    from kiln.ir.text import array_digest

    return array_digest(W0)


def _digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits, or the same arrays from $KILN_DIGITS_NPZ (images, target) on a
    machine without scikit-learn (the GPU machine: benchmarks/gpu_checks.sh stages them)."""
    import os

    staged = os.environ.get("KILN_DIGITS_NPZ")
    if staged:
        with np.load(staged, allow_pickle=False) as npz:
            return npz["images"], npz["target"]
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    return digits.images, digits.target


@pytest.mark.parametrize("target", ["llvm", pytest.param("tvm-cuda", marks=GPU)])
def test_lenet5_learns_handwritten_digits(target):
    """Digits (8x8, upsampled to 32x32): >= 97% held-out accuracy, on the CPU and on the GPU."""
    images, labels = _digits()
    x = np.kron(images.astype(np.float32) / 16.0, np.ones((4, 4), np.float32))[:, None]
    order = np.random.default_rng(0).permutation(len(x))
    x, y = x[order], labels[order]
    split = int(0.8 * len(x))
    trainer = kiln.train.Trainer(zoo.build("lenet5"), loss="ce", optimizer=Adam(lr=2e-3), target=target)
    history = trainer.fit((x[:split], y[:split]), epochs=6, batch_size=64, validation=(x[split:], y[split:]), progress=False)
    assert history[-1]["val_accuracy"] >= 0.97, history


def test_lstm_classifier_learns_a_sequence_task():
    """Which of 4 channels holds the one spike in 12 noisy steps: >= 95% held-out accuracy
    (the LSTM unrolled into GEMMs and gate math, differentiated through time)."""
    rng = np.random.default_rng(0)
    trainer = kiln.train.Trainer(zoo.build("lstm_classifier", input_size=4, hidden_size=32, num_layers=1, num_classes=4), loss="ce", optimizer=Adam(lr=1e-2), target="eager")
    history = trainer.fit(spike_sequences(rng, 1024), epochs=8, batch_size=64, validation=spike_sequences(rng, 256), progress=False)
    assert history[-1]["val_accuracy"] >= 0.95, history


def test_unet_learns_to_segment_shapes():
    """A small U-Net (transposed-conv upsampling, skip concatenations, training BatchNorm):
    mean IoU >= 0.9 on held-out images."""
    rng = np.random.default_rng(0)
    (x, y), (xv, yv) = shapes_segmentation(rng, 256), shapes_segmentation(rng, 64)
    trainer = kiln.train.Trainer(zoo.build("unet", in_channels=1, num_classes=3, width=8), loss="ce", optimizer=Adam(lr=3e-3), target="eager")
    trainer.fit((x, y), epochs=8, batch_size=16, progress=False)
    predicted = trainer.predict(xv).argmax(axis=1)
    ious = [((predicted == c) & (yv == c)).sum() / ((predicted == c) | (yv == c)).sum() for c in range(3)]
    assert np.mean(ious) >= 0.9, ious


def test_checkpoints_and_onnx_export_carry_the_trained_weights(tmp_path):
    x, y = _batch((8, 784), 10, 2)
    model = zoo.build("mlp", hidden=(16,))
    trainer = kiln.train.Trainer(model, loss="ce", optimizer=Adam(lr=1e-2), target="eager")
    for _ in range(3):
        trainer.step(x, y)
    trainer.save(tmp_path / "ckpt")
    assert (tmp_path / "ckpt.npz").exists() and (tmp_path / "ckpt.json").exists()
    again = kiln.train.Trainer(zoo.build("mlp", hidden=(16,)), loss="ce", optimizer=Adam(lr=1e-2), target="eager")
    again.step(x, y)  # its own state, then replaced by the checkpoint's
    again.load(tmp_path / "ckpt")
    assert again.steps_done == 3
    assert trainer.step(x, y) == again.step(x, y)  # the same state, optimizer moments included

    trainer.export(tmp_path / "trained.onnx", x)
    session = ort.InferenceSession(str(tmp_path / "trained.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": x})[0], trainer.predict(x), rtol=1e-4, atol=1e-5)


def test_an_onnx_model_trains_and_exports(tmp_path):
    x, y = _batch((8, 1, 32, 32), 10, 3)
    path = tmp_path / "lenet.onnx"
    kiln.export_onnx(zoo.build("lenet5"), path, [x], input_names=["input"])
    trainer = kiln.train.Trainer(str(path), loss="ce", optimizer=Adam(lr=3e-3), target="llvm")
    losses = [trainer.step(x, y) for _ in range(8)]
    assert losses[-1] < 0.7 * losses[0], losses
    trainer.export(tmp_path / "trained.onnx")
    session = ort.InferenceSession(str(tmp_path / "trained.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"input": x})[0], trainer.predict(x), rtol=1e-4, atol=1e-5)


def test_bad_targets_and_settings_are_named():
    x, y = _batch((4, 784), 10)
    trainer = kiln.train.Trainer(zoo.build("mlp", hidden=(8,)), loss="ce", target="eager")
    with pytest.raises(KilnError, match=r"class indices must lie in \[0, 10\)"):
        trainer.step(x, y + 10)
    with pytest.raises(KilnError, match="class indices of shape"):
        trainer.step(x, y[:2])
    with pytest.raises(KilnError, match="unknown loss 'hinge'"):
        kiln.train.Trainer(zoo.build("mlp"), loss="hinge", target="eager")


@pytest.mark.parametrize("name", ["lenet5", "lstm_classifier", "transformer_classifier"])
def test_training_steps_build_for_cuda_on_any_machine(name):
    """The step a GPU trains with (gradients, Adam's update) is scheduled and generated for CUDA
    without a GPU; running it there is test_lenet5_learns_handwritten_digits's tvm-cuda case."""
    entry = zoo.ZOO[name]
    x = np.zeros((4, *entry.small_shape[1:]), np.float32)
    trainer = kiln.train.Trainer(zoo.build(name, **entry.small_kwargs), loss="ce", optimizer=Adam(lr=3e-3), target="tvm-cuda", arch="sm_90")
    step, module = trainer._step_module(x)
    assert module.target == "tvm-cuda" and module.executable.library[:4] == b"\x7fELF"
    assert set(step.next_names.values()) <= {v.name for v in module.graph.outputs}, name  # every update is returned


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
def test_every_zoo_model_trains(name):
    """Six Adam steps on one batch (eager): every zoo model's loss falls, segmentation nets'
    per-pixel cross-entropy included (their Resize and ConvTranspose gradients)."""
    entry = zoo.ZOO[name]
    model = zoo.build(name, **entry.small_kwargs)
    x = np.random.default_rng(0).standard_normal((4, *entry.small_shape[1:])).astype(np.float32)
    out = model(kiln.Tensor(x[:1])).numpy()
    y = np.random.default_rng(1).integers(0, out.shape[1], (4, *out.shape[2:]))
    trainer = kiln.train.Trainer(model, loss="ce", optimizer=Adam(lr=3e-3), target="eager")
    losses = [trainer.step(x, y) for _ in range(6)]
    assert losses[-1] < losses[0], losses


def test_dropout_draws_a_new_mask_each_step():
    """Training-mode Dropout's mask comes from the seed and the step count: steps differ, a
    rerun repeats them, and llvm keeps the same elements as eager."""
    x, y = _batch((16, 784), 10, 3)

    def losses(target: str) -> list[float]:
        trainer = kiln.train.Trainer(zoo.build("mlp", hidden=(64,), dropout=0.5), loss="ce", optimizer=SGD(lr=0.0), target=target)
        return [trainer.step(x, y) for _ in range(3)]

    eager = losses("eager")
    assert len(set(eager)) == 3, f"with lr 0 only the mask can change the loss: {eager}"
    assert losses("eager") == eager
    np.testing.assert_allclose(losses("llvm"), eager, rtol=1e-5)


def test_class_indices_fit_logits_with_unit_spatial_dims():
    """A classifier ending in a global pool gives (N, C, 1, 1) logits (SqueezeNet): one class
    index per sample is accepted for them."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).normal(0, 0.5, (3, 2, 1, 1)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("GlobalAveragePool", ["c"], ["y"])], "pooled",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 4, 4])], [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3, 1, 1])], [w],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x, y = _batch((6, 2, 4, 4), 3)
    trainer = kiln.train.Trainer(model, loss="ce", optimizer=Adam(lr=0.1), target="eager")
    losses = [trainer.step(x, y) for _ in range(5)]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("target", ["eager", "llvm"])
def test_l1_and_l2_penalties_join_the_loss_and_its_gradient(target):
    """The first step's loss grows by l1 * sum|w| + l2 * sum w^2 of the initial weights, and
    SGD moves each weight further by lr * (l1 * sign(w) + 2 * l2 * w)."""
    x, y = _batch((8, 784), 10, 4)
    l1, l2, lr = 1e-3, 5e-3, 0.1
    plain = kiln.train.Trainer(zoo.build("mlp", hidden=(16,)), loss="ce", optimizer=SGD(lr=lr), target=target)
    penalized = kiln.train.Trainer(zoo.build("mlp", hidden=(16,)), loss="ce", optimizer=SGD(lr=lr), target=target, l1=l1, l2=l2)
    plain.predict(x)  # loads the initial weights into plain.values
    initial = {k: v.copy() for k, v in plain.values.items()}
    base, total = plain.step(x, y), penalized.step(x, y)
    weights = [initial[name] for name in plain.trainable]
    penalty = sum(l1 * np.abs(w).sum() + l2 * (w.astype(np.float64) ** 2).sum() for w in weights)
    assert total == pytest.approx(base + penalty, rel=1e-5)
    for name in plain.trainable:
        w = initial[name]
        np.testing.assert_allclose(penalized.values[name], plain.values[name] - lr * (l1 * np.sign(w) + 2 * l2 * w), rtol=1e-4, atol=1e-6)
