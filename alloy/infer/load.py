"""A model (or a pipeline stage of it) read and prepared for decoding in one step.

For a GGUF block format the stage is built one layer at a time (alloy.model.transformer.assemble):
read the layer in the checkpoint's dtype, quantize it, keep only its blocks, read the next — so
loading a bf16 checkpoint as Q4_0 never holds more than one layer's float weights beside the
blocks (a whole-model load first would peak at the checkpoint's size, 3.5x the Q4_0 model's).
Other dtypes load the stage whole and convert it (alloy.infer.optimize.prepare).

A stage whose MoE layers' experts run on another rank takes stand-ins for those modules and never
reads their tensors; `load_experts` reads just those modules, a layer at a time, for that rank.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from alloy.model import Transformer


def load_for_decoding(path: str | Path, dtype: str = "fp32", *, device=None, layers: tuple[int, int] | None = None,
                      embed: bool | None = None, head: bool | None = None,
                      stand_ins: dict[str, nn.Module] | None = None) -> Transformer:
    """`stand_ins` {module name: module}: modules put in place of the model's own, whose tensors
    are not read (alloy.checkpoint.io.fill)."""
    from alloy.checkpoint.io import open_model
    from alloy.infer.optimize import QUANT_FORMATS, decode_dtype, prepare
    from alloy.model.transformer import assemble
    from alloy.runtime.build import release_free_heap

    read = open_model(path)  # opened, indexed and its tokenizer read once for every piece
    if decode_dtype(dtype) not in QUANT_FORMATS:
        return prepare(read(device, layers=layers, embed=embed, head=head, stand_ins=stand_ins), dtype)
    spec = read.spec
    first, last = layers if layers is not None else (0, spec.num_layers)
    with_embed = first == 0 if embed is None else embed
    with_head = spec.causal and (last == spec.num_layers if head is None else head)

    def piece(span: tuple[int, int], piece_embed: bool, piece_head: bool) -> Transformer:
        part = read(device, layers=span, embed=piece_embed, head=piece_head, stand_ins=stand_ins)
        if next(part.parameters(), None) is None:  # the ends of a middle stage: nothing to convert
            return part
        return prepare(part, dtype)

    model = assemble(spec, (first, last), embed=with_embed, head=with_head, piece=piece).eval()
    release_free_heap()  # the float layers' freed pages
    return model


def load_experts(path: str | Path, layers: tuple[int, int], dtype: str = "fp32", *, device=None) -> nn.ModuleDict:
    """The MoE modules (router and experts) of the MoE layers in [a, b), {str(layer): MoE}, prepared
    for decoding in `dtype`: what an expert rank holds (a dense layer in the range stays with its stage). Read a layer at a time with everything else of
    the layer stood in for, so neither attention nor more than one layer's float experts is held."""
    import torch

    from alloy.checkpoint.io import open_model
    from alloy.errors import ConfigError
    from alloy.infer.optimize import prepare
    from alloy.model.layers import Block
    from alloy.runtime.build import release_free_heap

    read = open_model(path)
    spec = read.spec
    first, last = layers
    if not 0 <= first < last <= spec.num_layers:
        raise ConfigError(f"expert layers [{first}, {last}) are not a non-empty range within the model's "
                          f"{spec.num_layers} layers")
    moe = [i for i in range(first, last) if spec.is_moe_layer(i)]
    if not moe:
        raise ConfigError(f"layers [{first}, {last}) of {spec.family} have no experts (dense layers only)")
    out = nn.ModuleDict()
    for i in moe:
        with torch.device("meta"):
            others = [name for name, _ in Block(spec, i).named_children() if name != "mlp"]
        part = read(device, layers=(i, i + 1), embed=False, head=False,
                    stand_ins={f"layers.{i}.{name}": nn.Identity() for name in others})
        out[str(i)] = prepare(part.layers[str(i)].mlp, dtype)
        del part
    release_free_heap()
    out.spec = spec  # the model's: what size of hidden states its layers take
    return out.eval()
