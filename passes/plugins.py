"""Where passes come from: kiln's own modules, the ``kiln.passes`` entry-point group, and
modules named with ``--pass-plugin`` (importing a module registers the passes it defines)."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from kiln.errors import KilnError

_loaded = False


def load_builtin_and_entry_point_passes() -> None:
    """Import kiln's pass modules and every installed ``kiln.passes`` plugin, once."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    from kiln.passes import canonicalize, conv_transpose, decompose, decompose_rnn, fold_batchnorm, fuse, gemm_sums, integer_products, layout, plan_memory, rematerialize, weights  # noqa: F401

    for ep in entry_points(group="kiln.passes"):
        try:
            registered = ep.load()
        except Exception as err:  # noqa: BLE001 - a broken plugin must say which one it is
            raise KilnError(f"pass plugin {ep.name!r} ({ep.value}) failed to load: {err}") from err
        _register_loaded(registered)


def _register_loaded(obj: object) -> None:
    from kiln.passes.base import Pass, register_pass

    if isinstance(obj, Pass) or (isinstance(obj, type) and issubclass(obj, Pass)):
        register_pass(obj)


def load_plugin(module: str) -> None:
    """Import ``module`` (``--pass-plugin some.module``) so the passes it registers exist."""
    load_builtin_and_entry_point_passes()
    try:
        importlib.import_module(module)
    except ImportError as err:
        raise KilnError(f"pass plugin {module!r} cannot be imported: {err}") from None
