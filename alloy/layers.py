"""Public name for alloy.framework.layers (the seed example imports `from alloy.layers import ...`)."""

from alloy.framework.layers import *  # noqa: F401,F403
from alloy.framework.layers import __all__  # noqa: F401
