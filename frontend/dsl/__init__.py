"""The Python DSL: tensors, layers and tracing (``kiln.Tensor``, ``kiln.nn``, ``kiln.trace``)."""
