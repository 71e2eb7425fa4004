"""Planner fidelity: importers for published heterogeneous-cluster artifacts (Helix, Sailor, AMP)
into Alloy inventories, and the checks that hold Alloy's cost model and planner against their
measurements. docs/FIDELITY.md has the results; `python -m bench validate` reruns them.
"""

from __future__ import annotations

import os
from pathlib import Path

from alloy.errors import ConfigError

ENV_VAR = "ALLOY_PUBLISHED_DATA"


def data_root() -> Path | None:
    """The published-clusters folder: $ALLOY_PUBLISHED_DATA, else ../shared/data/published-clusters."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    here = Path(__file__).resolve().parents[2]  # the repository root (this is bench/fidelity/)
    for base in (here.parent, here):
        candidate = base / "shared" / "data" / "published-clusters"
        if (candidate / "README.md").is_file():
            return candidate
    return None


def require_data_root() -> Path:
    root = data_root()
    if root is None or not root.is_dir():
        raise ConfigError(f"published-clusters data not found: set {ENV_VAR} or check out ../shared")
    return root
