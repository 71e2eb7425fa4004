"""Typed errors. Each carries a one-line, actionable message; the CLI prints it and exits 2."""


class AlloyError(Exception):
    """Base of every error Alloy raises for bad input (never for its own bugs)."""

    exit_code = 2


class UnsupportedModelError(AlloyError):
    """A model family or an architecture knob value that Alloy does not implement."""


class ConfigError(AlloyError):
    """A config file that cannot be read or holds invalid values."""


class CheckpointError(AlloyError):
    """Weights that are missing, extra, mis-shaped, corrupt, or not safetensors."""


class PlanError(AlloyError):
    """A planning request that cannot be met: it does not fit, or asks for an impossible layout."""
