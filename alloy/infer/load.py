"""A model (or a pipeline stage of it) read and prepared for decoding in one step.

For a GGUF block format the stage is built one layer at a time (alloy.model.transformer.assemble),
and within a layer (from a folder's safetensors) each weight a few rows at a time: the weights
prepare quantizes (every nn.Linear's, the token table) are left on disk by the read
(alloy.checkpoint.io.fill's `rows`), prepare fuses q/k/v and gate/up by stacking their rows there,
and alloy.quant.quantize reads CHUNK_WEIGHTS of a weight, quantizes them into their rows of the
layer's blocks (in the kernel's layout) and reads the next. So what loading holds beside the
blocks is one chunk's float rows and the quantizer's temporaries: a ~98M bf16 Llama loaded as Q4_0
peaks at 1.08-1.13x its blocks (tests/test_quant_memory.py), where quantizing after a whole-model
load peaks at 6.7x and a layer at a time from float layers at 1.5-2.1x (each layer as read, its
fused copies and the file's mapped pages on top). A GGUF file is read a layer at a time.
Other dtypes load the stage whole and convert it (alloy.infer.optimize.prepare).

A stage whose MoE layers' experts run on another rank takes stand-ins for those modules and never
reads their tensors; `load_experts` reads just those modules, a layer at a time, for that rank.
"""

from __future__ import annotations

from pathlib import Path

import torch
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
        on_disk = {}
        if getattr(read, "reads_rows", False):  # a GGUF file's reader reads tensors whole
            on_disk = {"rows": _quantized_weights(spec, span, piece_embed, piece_head)}
        part = read(device, layers=span, embed=piece_embed, head=piece_head, stand_ins=stand_ins, **on_disk)
        if next(part.parameters(), None) is None:  # the ends of a middle stage: nothing to convert
            return part
        return prepare(part, dtype)  # fusing q/k/v and gate/up stacks rows still on disk

    model = assemble(spec, (first, last), embed=with_embed, head=with_head, piece=piece).eval()
    release_free_heap()  # the freed chunks and temporaries
    return model


def _quantized_weights(spec, span: tuple[int, int], embed: bool, head: bool) -> frozenset[str]:
    """The weights of this piece that prepare quantizes: every nn.Linear's and the token table's.
    None of them where they are all the piece's parameters (prepare finds the device from one that is
    not: a head-only end without a final norm, which no family has), so those are read whole."""
    with torch.device("meta"):
        part = Transformer(spec, span, embed=embed, head=head)
    names = {f"{name}.weight" for name, module in part.named_modules() if type(module) is nn.Linear}
    if embed:
        names.add("embed.tok.weight")
    if all(name in names for name, _ in part.named_parameters()):
        return frozenset()
    return frozenset(names)


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
