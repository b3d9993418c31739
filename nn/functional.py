"""``kiln.nn.functional``: the module ``kiln.frontend.dsl.functional`` under its public name."""

import sys

from kiln.frontend.dsl import functional as _implementation

sys.modules[__name__] = _implementation
