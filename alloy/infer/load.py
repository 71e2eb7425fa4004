"""A model (or a pipeline stage of it) read and prepared for decoding in one step.

For a GGUF block format the stage is built one layer at a time (alloy.model.transformer.assemble):
read the layer in the checkpoint's dtype, quantize it, keep only its blocks, read the next — so
loading a bf16 checkpoint as Q4_0 never holds more than one layer's float weights beside the
blocks (a whole-model load first would peak at the checkpoint's size, 3.5x the Q4_0 model's).
Other dtypes load the stage whole and convert it (alloy.infer.optimize.prepare).
"""

from __future__ import annotations

from pathlib import Path

from alloy.model import Transformer


def load_for_decoding(path: str | Path, dtype: str = "fp32", *, device=None, layers: tuple[int, int] | None = None,
                      embed: bool | None = None, head: bool | None = None) -> Transformer:
    from alloy.checkpoint.io import open_model
    from alloy.infer.optimize import QUANT_FORMATS, decode_dtype, prepare
    from alloy.model.transformer import assemble
    from alloy.runtime.build import release_free_heap

    read = open_model(path)  # opened, indexed and its tokenizer read once for every piece
    if decode_dtype(dtype) not in QUANT_FORMATS:
        return prepare(read(device, layers=layers, embed=embed, head=head), dtype)
    spec = read.spec
    first, last = layers if layers is not None else (0, spec.num_layers)
    with_embed = first == 0 if embed is None else embed
    with_head = spec.causal and (last == spec.num_layers if head is None else head)

    def piece(span: tuple[int, int], piece_embed: bool, piece_head: bool) -> Transformer:
        part = read(device, layers=span, embed=piece_embed, head=piece_head)
        if next(part.parameters(), None) is None:  # the ends of a middle stage: nothing to convert
            return part
        return prepare(part, dtype)

    model = assemble(spec, (first, last), embed=with_embed, head=with_head, piece=piece).eval()
    release_free_heap()  # the float layers' freed pages
    return model
