"""Fusion (seed step 4): a distributed run's shards -> one standard model."""

from alloy.fuse.fuse import find_checkpoint, fuse_run

__all__ = ["find_checkpoint", "fuse_run"]
