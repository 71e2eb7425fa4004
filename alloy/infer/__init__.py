"""Inference: KV-cached generation, weight-only int8, partitioned over devices (seed step 5)."""

from alloy.infer.generate import Generation, ModelRunner, generate, stream
from alloy.infer.sampling import Sampler, Sampling

__all__ = ["Generation", "ModelRunner", "Sampler", "Sampling", "generate", "stream"]
