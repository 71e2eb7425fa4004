"""The forward pass as an ONNX model: token ids [batch, sequence] -> logits [batch, sequence, vocab]
(or hidden states for an encoder), both axes dynamic. onnxruntime runs it on any of its
execution providers — the hardware-neutral side of the seed's "standard model interface".

Exported with torch.onnx's dynamo exporter (onnxscript). The embeddings run outside the
Transformer slice so that no data-dependent check on positions (learned-position range) ends
up in the traced graph; the body is the same `Transformer`, built without its embeddings.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from alloy.errors import CheckpointError, UnsupportedModelError
from alloy.model import Transformer

EXTERNAL_DATA_BYTES = 1024**3  # protobuf caps a file at 2 GiB; larger weights go beside it


class _TokensToOutput(nn.Module):
    """input_ids [B, T] -> the model's output, positions 0..T-1 for every row."""

    def __init__(self, model: Transformer):
        super().__init__()
        spec = model.spec
        self.embed = model.embed
        with torch.device("meta"):
            self.body = Transformer(spec, embed=False)
        state = {k: v for k, v in model.state_dict().items() if not k.startswith("embed.")}
        if spec.causal and spec.tie_embeddings:
            state["head.weight"] = model.embed.tok.weight  # the slice without embeddings keeps a copy
        self.body.load_state_dict(state, strict=True, assign=True)
        if spec.positions == "rope":
            self.body.inv_freq = model.inv_freq
        self.body.eval()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.shape
        positions = torch.arange(T, device=input_ids.device).expand(B, T)
        return self.body(self.embed(input_ids, positions), positions=positions)


def export_onnx(model_or_dir, out: str | Path, *, dtype: str | None = None, opset: int = 18) -> Path:
    """Write the model (a Transformer or an HF directory) as an ONNX file at `out`."""
    try:
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it)
    except ImportError:
        raise UnsupportedModelError("ONNX export needs onnx and onnxscript: pip install 'alloy-lm[export]'") from None
    from alloy.checkpoint.io import load, staging_path, sweep_stale

    model = load(model_or_dir, dtype=dtype) if not isinstance(model_or_dir, Transformer) else model_or_dir
    spec = model.spec
    if spec.layer_types:  # the window test compares it with the (dynamic) sequence length
        raise UnsupportedModelError("ONNX export of sliding-window attention is not supported yet "
                                    f"(this model has sliding_window={spec.sliding_window})")
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _TokensToOutput(model).eval()
    example = torch.randint(0, spec.vocab_size, (2, min(8, spec.max_seq_len)))
    batch = torch.export.Dim("batch")
    sequence = torch.export.Dim("sequence", max=spec.max_seq_len)
    size_bytes = sum(p.numel() * p.element_size() for p in wrapper.parameters())
    sweep_stale(target)  # what a killed export of this file left
    staging = staging_path(target)
    staging.mkdir()  # with the umask (tempfile.mkdtemp's is 0700) and a name the sweep knows
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper, (example,), str(staging / target.name), input_names=["input_ids"],
                output_names=["logits" if spec.causal else "last_hidden_state"],
                dynamic_shapes={"input_ids": {0: batch, 1: sequence}}, dynamo=True, opset_version=opset,
                external_data=size_bytes > EXTERNAL_DATA_BYTES, verbose=False,
            )
        files = sorted(staging.iterdir(), key=lambda p: p.name == target.name)  # the .onnx file last
        for path in files:
            path.replace(target.parent / path.name)
    except Exception as err:
        raise CheckpointError(f"ONNX export failed: {' '.join(str(err).split())[:300]}") from err
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
