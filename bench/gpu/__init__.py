"""The prepared GPU benchmarks that `bench/gpu.sh` runs on a CUDA machine, one process each.

  python -m bench.gpu.train      training tokens/s and MFU vs. transformers (~1B Llama, bf16)
  python -m bench.gpu.decode     decode tokens/s vs. transformers generate, and the HBM roofline
  python -m bench.gpu.partition  GPU (memory capped) + CPU: Alloy's planned split vs. accelerate
  python -m bench.gpu.summary    one summary JSON over the three results

Each takes `--device cuda` (the real run) or `--device cpu --tiny` (a seconds-long smoke test of
the same code path, for CI). Only torch, transformers, accelerate and alloy modules that need
torch alone are imported, except `alloy.plan` / `alloy.devices` in partition (pydantic).
"""
