"""kiln: a deep-learning compiler and graph optimizer.

    import kiln
    module = kiln.compile("model.onnx", target="eager", shapes={"x": (1, 3, 224, 224)})
    outputs = module.run({"x": array})
"""

__version__ = "0.1.0"

from kiln.errors import KilnError  # noqa: E402
from kiln.driver import compile, optimize  # noqa: E402
from kiln.runtime.module import Module, load  # noqa: E402
from kiln.frontend.dsl.tensor import Tensor  # noqa: E402
from kiln.frontend.dsl.trace import jit, trace  # noqa: E402
from kiln.frontend.onnx.export import export_onnx  # noqa: E402
from kiln import optim, train  # noqa: E402  (kiln.optim.Adam, kiln.train.Trainer)

__all__ = ["KilnError", "Module", "Tensor", "compile", "export_onnx", "jit", "load", "optim", "optimize", "trace", "train", "__version__"]


def __getattr__(name: str):
    # kiln.onnx_backend: the onnx.backend.base.Backend adapter, imported on first use
    if name == "nn":
        import kiln.nn

        return kiln.nn
    if name == "onnx_backend":
        from kiln.runtime import onnx_backend

        return onnx_backend
    raise AttributeError(f"module 'kiln' has no attribute {name!r}")
