"""kiln's model zoo: models users can name instead of a file.

For now these are the nine ``light_*`` ImageNet nets shipped inside the onnx wheel (small
weights, real architectures: ResNet-50, DenseNet-121, Inception, SqueezeNet, VGG-19, ...).
"""

from __future__ import annotations

from pathlib import Path


def _light_dir() -> Path:
    import onnx

    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def builtin_models() -> dict[str, Path]:
    """Name -> ONNX file of every built-in model."""
    return {p.stem: p for p in sorted(_light_dir().glob("light_*.onnx"))}


def builtin_model_path(name: str) -> Path | None:
    return builtin_models().get(name)


DEFAULT_MODEL = "light_resnet50"
