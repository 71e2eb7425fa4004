"""Public name for alloy.framework.text (the seed example imports `from alloy.text import ...`)."""

from alloy.framework.text import *  # noqa: F401,F403
from alloy.framework.text import __all__  # noqa: F401
