"""``kiln.nn.init``: the module ``kiln.frontend.dsl.init`` under its public name."""

import sys

from kiln.frontend.dsl import init as _implementation

sys.modules[__name__] = _implementation
