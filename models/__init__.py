"""kiln's model zoo: DSL models buildable by name, and the light ONNX nets of the onnx wheel.

    model = kiln.models.resnet18(num_classes=10)     # a kiln.nn.Module
    kiln.compile("unet", shapes={"input": (1, 3, 128, 128)})

``ZOO`` lists the DSL families (MLP, LeNet-5, ResNet-18/34/50, MobileNetV2, LSTM and GRU
classifiers, a transformer encoder classifier, FCN-8s, U-Net, DeepLabv3); ``builtin_models()`` the nine ``light_*`` ImageNet nets shipped
inside the onnx wheel (small weights, real architectures).
"""

from __future__ import annotations

from pathlib import Path

from kiln.models.classic import lenet5, mlp
from kiln.models.mobilenet import mobilenet_v2
from kiln.models.resnet import resnet18, resnet34, resnet50
from kiln.models.rnn import gru_classifier, lstm_classifier
from kiln.models.segmentation import deeplabv3, fcn, unet
from kiln.models.transformer import transformer_classifier
from kiln.models.zoo import ZOO, build, zoo_graph, zoo_onnx

__all__ = [
    "ZOO", "build", "builtin_models", "deeplabv3", "fcn", "gru_classifier", "lenet5", "lstm_classifier",
    "mlp", "mobilenet_v2", "resnet18", "resnet34", "resnet50", "transformer_classifier", "unet", "zoo_graph", "zoo_onnx",
]


def _light_dir() -> Path:
    import onnx

    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def builtin_models() -> dict[str, Path]:
    """Name -> ONNX file of every light net of the onnx wheel."""
    return {p.stem: p for p in sorted(_light_dir().glob("light_*.onnx"))}


def builtin_model_path(name: str) -> Path | None:
    return builtin_models().get(name)


DEFAULT_MODEL = "resnet18"
