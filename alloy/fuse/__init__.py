"""Fusion (seed step 4): a distributed run's shards -> one standard model (a LoRA run's adapters folded
into its base with merge_lora=True); merging; export."""

from alloy.fuse.export import export_model
from alloy.fuse.fuse import find_checkpoint, fuse_run
from alloy.fuse.merge import merge

__all__ = ["export_model", "find_checkpoint", "fuse_run", "merge"]
