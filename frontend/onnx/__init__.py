"""ONNX import: ``load_model`` reads a file safely, ``import_onnx`` turns it into a kiln Graph."""

from kiln.frontend.onnx.importer import import_onnx, supported_ops
from kiln.frontend.onnx.loader import load_model

__all__ = ["import_onnx", "load_model", "supported_ops"]
