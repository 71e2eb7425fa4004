"""Public name for alloy.framework.data (the seed example imports `from alloy.data import ...`)."""

from alloy.framework.data import *  # noqa: F401,F403
from alloy.framework.data import __all__  # noqa: F401
