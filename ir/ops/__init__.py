"""Every op family; importing this package registers all of kiln's ops."""

from kiln.ir.ops import attention, elementwise, fused, linalg, loss, nn, norm, quant, reduce, resize, rnn, shape, signal  # noqa: F401
