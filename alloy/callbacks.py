"""Public name for alloy.framework.callbacks (the seed example imports `from alloy.callbacks import ...`)."""

from alloy.framework.callbacks import *  # noqa: F401,F403
from alloy.framework.callbacks import __all__  # noqa: F401
