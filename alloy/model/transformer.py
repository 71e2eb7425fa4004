"""One Transformer for every family a ModelSpec describes, buildable as a layer range.

`Transformer(spec)` is the whole model. `Transformer(spec, layers=(a, b))` holds only layers
[a, b) — with the embeddings when a == 0 and the head when b == num_layers, unless told
otherwise — so a pipeline stage holds just its slice. Parameter names use global layer
indices (`layers.7.attn.wq.weight`), so a slice's state dict is a subset of the whole one.

Inputs flow as token ids into a slice with embeddings and as hidden states [B, T, hidden]
into one without; outputs are logits [B, T, vocab] from a slice with the head, hidden states
otherwise (an encoder has no head: its output is always hidden states).
"""

from __future__ import annotations

import torch
from torch import nn

from alloy.errors import ConfigError
from alloy.model.cache import KVCache, SlotCache
from alloy.model.layers import ROPE_FULL, ROPE_LONG, Block, Norm, rope_inv_freq, rope_scale, rope_tables
from alloy.spec import ModelSpec


def _init_weights(module: nn.Module) -> None:
    """GPT-style init (N(0, 0.02), zero biases) for training from scratch; loading overwrites it."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class Embeddings(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.tok = nn.Embedding(spec.vocab_size, spec.hidden_size)
        if spec.type_vocab_size:
            self.types = nn.Embedding(spec.type_vocab_size, spec.hidden_size)
        if spec.positions == "learned":
            self.pos = nn.Embedding(spec.max_seq_len, spec.hidden_size)
        if spec.embedding_norm:
            self.norm = Norm(spec)

    def forward(self, input_ids, positions, token_type_ids=None):
        x = self.tok(input_ids)
        if self.spec.embedding_scaled:
            # The multiplier is rounded to the activation dtype first, as the reference does.
            x = x * torch.tensor(self.spec.embedding_multiplier, dtype=x.dtype)
        if self.spec.type_vocab_size:
            types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
            x = x + self.types(types)
        if self.spec.positions == "learned":
            x = x + self.pos(positions)
        if self.spec.embedding_norm:
            x = self.norm(x)
        return x


class Transformer(nn.Module):
    def __init__(
        self,
        spec: ModelSpec,
        layers: tuple[int, int] | None = None,
        *,
        embed: bool | None = None,
        head: bool | None = None,
    ):
        super().__init__()
        first, last = layers if layers is not None else (0, spec.num_layers)
        if not 0 <= first <= last <= spec.num_layers:
            raise ConfigError(f"layer range [{first}, {last}) is outside the model's {spec.num_layers} layers")
        self.spec = spec
        self.layer_range = (first, last)
        self.has_embed = first == 0 if embed is None else embed
        self.has_head = spec.causal and (last == spec.num_layers if head is None else head)
        self.tokenizer = None  # a `tokenizers.Tokenizer` when loaded from a directory that has one
        self.side_files: dict[str, bytes] = {}  # tokenizer/generation files to write back on save

        if self.has_embed:
            self.embed = Embeddings(spec)
        self.layers = nn.ModuleDict({str(i): Block(spec, i) for i in range(first, last)})
        ends_model = self.has_head or (not spec.causal and last == spec.num_layers)
        if ends_model and spec.final_norm:
            self.norm = Norm(spec)
        # A tied head reuses the embedding matrix; a slice without embeddings keeps a copy.
        if self.has_head and not (spec.tie_embeddings and self.has_embed):
            self.head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.positions == "rope":
            self.register_buffer("inv_freq", rope_inv_freq(spec), persistent=False)  # [3, rope_dim / 2]
        self.apply(_init_weights)


    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None, *,
                  slots: bool = False) -> KVCache:
        """A preallocated KV cache for this slice's layers; `slots`: rows that fill independently. Its
        dtype: `dtype`, else the model's `kv_cache_dtype` (alloy.infer.optimize.prepare sets bf16 for
        bf16 and block-format decoding where the fused step reads it; on the CPU, where that step
        runs: a prepared model moved to a GPU gets its parameters'), else the parameters'."""
        param = next(self.parameters())
        chosen = getattr(self, "kv_cache_dtype", None) if param.device.type == "cpu" else None
        dtype = dtype or chosen or param.dtype
        return (SlotCache if slots else KVCache)(self.spec, range(*self.layer_range), batch_size, max_len,
                                                 device=param.device, dtype=dtype)

    def forward(
        self,
        x: torch.Tensor,
        *,
        positions: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x: token ids [B, T] (slice with embeddings) or hidden states [B, T, hidden].

        positions [B, T] default to the next T positions after what `cache` holds.
        attention_mask [B, keys] marks real (1) and padding (0) keys, where keys counts the
        cached slots plus these T. With a cache, the cache advances by T.
        """
        B, T = x.shape[:2]
        start = cache.length if cache is not None else 0  # a [B] tensor for a SlotCache
        if cache is not None and int(start.max() if torch.is_tensor(start) else start) + T > cache.max_len:
            raise ConfigError(f"KV cache holds {cache.max_len} positions; asked for "
                              f"{int(start.max() if torch.is_tensor(start) else start) + T}")
        if positions is None:
            steps = torch.arange(T, device=x.device)
            positions = start[:, None] + steps if torch.is_tensor(start) else (start + steps).expand(B, T)
        if self.has_embed:
            if positions.max() >= self.spec.max_seq_len and self.spec.positions == "learned":
                raise ConfigError(f"position {int(positions.max())} is beyond the model's {self.spec.max_seq_len}")
            x = self.embed(x, positions, token_type_ids)
        rope = self._rope(positions, x.dtype) if self.spec.positions == "rope" else None
        windows = {block.attn.window for block in self.layers.values()}
        masks = {w: self._mask(w, start, T, attention_mask, x.device) for w in windows}
        for block in self.layers.values():
            x = block(x, rope, masks, cache, start)
        if cache is not None:
            cache.length = start + T
        if hasattr(self, "norm"):
            x = self.norm(x)
        if not self.has_head:
            return x
        # the head is called as a module so alloy.infer can swap its weight layout or quantize it
        logits = self.head(x) if hasattr(self, "head") else x @ self.embed.tok.weight.t()
        if self.spec.final_softcap:
            logits = torch.tanh(logits / self.spec.final_softcap) * self.spec.final_softcap
        return logits

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> dict:
        """{table row: (cos, sin)} for the rows this slice's layers read."""
        spec = self.spec
        full = ROPE_FULL
        # As transformers: LongRoPE's long factors once a position in this call passes the
        # original length (earlier cached keys keep the rotation they were stored with).
        if spec.rope_scaling == "longrope" and int(positions.max()) + 1 > spec.rope_original_max_seq_len:
            full = ROPE_LONG
        rows = {block.attn.rope_row for block in self.layers.values()}
        return {row: rope_tables(self.inv_freq[full if row == ROPE_FULL else row], positions, dtype,
                                 rope_scale(spec, row)) for row in rows}

    def _mask(self, window, start, T, attention_mask, device):
        """(bool mask [B|1, 1, T, keys] or None, is_causal) for SDPA.

        Masks live in slot space (a key's index in the cache): the offset between two slots
        equals the offset between their positions, so windows hold even for left padding.
        `start` is a [B] tensor for a SlotCache: each row's queries sit at its own slots, and a
        row sees none of the slots past its own (they may hold an earlier request's keys).
        """
        rows = torch.is_tensor(start)
        keys = (int(start.max()) if rows else start) + T
        causal = self.spec.causal
        window_active = window and window < keys
        if not rows and attention_mask is None and not window_active:
            if not causal or T == 1:
                return None, False
            if start == 0:
                return None, True
        steps = torch.arange(T, device=device)
        q_slot = (start[:, None] + steps if rows else (start + steps)[None])[:, None, :, None]  # [B|1, 1, T, 1]
        k_slot = torch.arange(keys, device=device)
        allowed = torch.ones(q_slot.shape[0], 1, T, keys, dtype=torch.bool, device=device)
        if rows:
            allowed &= k_slot < (start + T)[:, None, None, None]
        if causal:
            allowed &= k_slot <= q_slot
        if window_active:
            allowed &= q_slot - k_slot < window
        if attention_mask is not None:
            if attention_mask.shape[-1] != keys:
                raise ConfigError(f"attention_mask covers {attention_mask.shape[-1]} keys; expected {keys}")
            allowed = allowed & attention_mask.bool()[:, None, None, :]
            # A padding query would see no key at all and give NaN; let it see itself.
            allowed = allowed | (k_slot == q_slot)
        return allowed, False


def assemble(spec: ModelSpec, layers: tuple[int, int], *, embed: bool, head: bool, piece) -> Transformer:
    """A stage of layers [a, b) built one piece at a time: `piece((i, i + 1), False, False)` makes
    layer i and `piece((a, a), embed, head)` the stage's ends (embeddings, final norm, head), each
    a finished Transformer slice (loaded, quantized, adapted: whatever the caller does to it),
    moved in before the next is made. So a conversion that needs a float copy of the weights
    (quantizing, QLoRA) holds one layer's copy at a time, never the stage's."""
    first, last = layers
    with torch.device("meta"):
        model = Transformer(spec, layers, embed=embed, head=head)
    ends = piece((first, first), embed, head)
    for name, module in ends.named_children():
        if name != "layers":
            setattr(model, name, module)
    for name, buffer in ends.named_buffers(recurse=False):
        setattr(model, name, buffer)
    model.tokenizer, model.side_files = ends.tokenizer, ends.side_files
    del ends
    for i in range(first, last):
        model.layers[str(i)] = piece((i, i + 1), False, False).layers[str(i)]
    left = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:  # a module the pieces do not fill: a layout this builder does not know
        raise ConfigError(f"cannot build {', '.join(left[:3])} piece by piece for this model")
    return model
