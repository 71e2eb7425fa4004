"""The cost model: FLOPs and bytes of each piece of a model, derived from its ModelSpec.

Pieces are the embedding, each transformer layer, and the head. Everything is per *token* (or
per sample for sequence-long quantities) so the timing model can scale by micro-batch size.
Per-layer arrays (not one number) because sliding-window layers cost less attention.
Formulas are written out in docs/PLANNER.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from typing import Literal

import numpy as np

from alloy.errors import PlanError
from alloy.spec import ModelSpec

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}
ADAMW_STATE_BYTES = 8  # exp_avg and exp_avg_sq, fp32 each
MASTER_WEIGHT_BYTES = 4  # fp32 master copy kept when training in a 16/8-bit dtype
LOGITS_BYTES = 4  # logits are upcast to fp32 for the loss / sampling
MESSAGE_BYTES = 4  # fp32: a training step's activations and gradients on the wire
# KV cache bytes per element where they are not the weights': int8 (and the GGUF block formats a
# decode plan counts as int8) is weights only, the keys and values fp32 on a CPU (bf16 with the
# block formats' fused step, bf16 on a GPU): the largest, so a plan never counts on room it lacks.
KV_BYTES = {"int8": 4}
# Far above any real step (BERT was trained at 65536 samples a step) yet bounded: the search
# loops over micro-batch counts, so `--batch-size 10**18` must be refused, not iterated.
MAX_BATCH = 1 << 20
MAX_TOKENS = 1 << 24  # ModelSpec's highest max_seq_len
# Training holds ~5.5 logits-sized fp32 tensors at the loss's peak (the logits, the log-softmax the
# cross-entropy keeps, and in backward their gradients and a copy): measured on a CPU worker,
# h512 / vocab 8192 / seq 128, as the peak-RSS slope over the batch (tests/test_memory_estimate.py).
TRAIN_LOGITS_COPIES = 5.5
# A training worker's runtime beyond its tensors (oneDNN scratch, the allocator's pools and the heap
# that glibc's rising mmap threshold keeps, autograd's bookkeeping, gloo's buffers): 120-135 MiB on
# CPU workers at 14M-34M parameters, one worker or two (Xeon AVX-512: +40..+60 MiB over the tensors'
# 80; a CI runner measured +113 on a data-parallel rank). Centred, so one machine's spread stays
# inside the 15 % bound of tests/test_memory_estimate.py.
TRAIN_WORKER_OVERHEAD_BYTES = 128 * 1024**2
# A LoRA worker's heap keeps freed forward temporaries resident beside the activations it keeps
# (glibc reuses a hole only for a chunk that fits it; nothing frees the base's gradients' worth of
# memory into those holes as full training's backward does). Measured on the Xeon AVX-512, 98M and
# 34M Llamas, LoRA and QLoRA (q4_0, q8_0), batch 4-8, seq 128-256: peak RSS minus the estimate
# without this term was 0.03-0.7 of the kept activations, run-to-run spread included; 0.5 centres
# the ~100M QLoRA case of tests/test_memory_estimate.py (measured 797-1003 MiB over 7 runs).
LORA_HEAP_RETAINED = 0.5
# Bytes per weight of each GGUF block format a QLoRA base may use: alloy.quant.formats's block bytes
# over block weights, written out because the planner imports no torch (a test holds them equal).
QUANT_BYTES = {"q8_0": 34 / 32, "q4_0": 18 / 32, "q4_1": 20 / 32, "q4_k": 144 / 256}


@dataclass(frozen=True)
class Workload:
    task: Literal["train", "infer"]
    batch_size: int  # samples per optimizer step (train) or concurrent requests (infer)
    seq_len: int  # tokens per sample (train) or prompt length (infer)
    dtype: str = "bf16"
    micro_batches: int | None = None  # None: the search picks
    checkpointing: bool = False  # activation checkpointing: keep layer inputs, recompute the rest
    new_tokens: int = 128  # infer: tokens generated per request
    lora_rank: int | None = None  # train: LoRA adapters of this rank on every block linear, the base frozen
    quantize_base: str | None = None  # train with LoRA (QLoRA): the frozen block linears in this GGUF format

    def __post_init__(self) -> None:
        if self.task not in ("train", "infer"):
            raise PlanError(f"task must be train or infer, got {self.task!r}")
        if self.lora_rank is not None and (not isinstance(self.lora_rank, Integral) or isinstance(self.lora_rank, bool)
                                           or self.lora_rank < 1 or self.task != "train"):
            raise PlanError(f"lora rank must be a positive integer for a training workload, got {self.lora_rank!r}")
        if self.quantize_base is not None and (self.lora_rank is None or self.quantize_base not in QUANT_BYTES):
            raise PlanError(f"quantize_base needs a LoRA rank and one of {', '.join(QUANT_BYTES)}, "
                            f"got {self.quantize_base!r}")
        if self.dtype not in DTYPE_BYTES:
            raise PlanError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPE_BYTES)}")
        for name, low, high in (("batch_size", 1, MAX_BATCH), ("seq_len", 1, MAX_TOKENS),
                                ("micro_batches", 1, MAX_BATCH), ("new_tokens", 0, MAX_TOKENS)):
            value = getattr(self, name)
            if value is None and name == "micro_batches":
                continue  # the search picks
            if not isinstance(value, Integral) or isinstance(value, bool) or not low <= value <= high:
                raise PlanError(f"{name} must be an integer from {low} to {high:,}, got {value!r}")


@dataclass(frozen=True)
class ModelCosts:
    """Per-piece costs of one model under one workload. Arrays have one entry per layer."""

    num_layers: int
    hidden_size: int
    vocab_size: int
    dtype_bytes: int
    param_state_bytes: int  # bytes held per parameter: weights (+ grads, master, AdamW when training)
    layer_params: np.ndarray  # (L,)
    layer_step_flops_per_sample: np.ndarray  # (L,) fwd (+bwd, +recompute) FLOPs for one sample
    layer_act_bytes_per_sample: np.ndarray  # (L,) bytes kept per sample until its backward
    layer_peak_bytes_per_sample: np.ndarray  # (L,) transient bytes while one layer runs
    layer_kv_bytes_per_sample: np.ndarray  # (L,) KV cache of one request (infer)
    layer_decode_flops_per_sample: np.ndarray  # (L,) one generated token (infer)
    layer_kv_read_bytes_per_sample: np.ndarray  # (L,) KV bytes one decode step reads (infer)
    embed_params: int
    head_params: int  # the LM head's own weights; with tied embeddings a copy on the last stage
    tied: bool
    head_step_flops_per_sample: float
    head_peak_bytes_per_sample: float  # logits (and their grad when training)
    head_decode_flops_per_sample: float
    boundary_bytes_per_sample: float  # hidden states crossing a stage boundary, one direction
    boundary_decode_bytes_per_sample: float
    total_param_bytes: float  # the gradient an all-reduce moves (whole model, in dtype; LoRA: the adapters)
    # LoRA: the frozen base holds weights only; the adapters hold weights, grads and AdamW state
    layer_adapter_params: float = 0.0  # adapter parameters of one layer (0: full training)
    adapter_state_bytes: int = 0
    # QLoRA: bytes one layer saves by holding its block linears quantized instead of in fp32
    layer_quant_saving_bytes: float = 0.0
    # MoE: what an expert placement moves off a layer (router + every expert), per layer (0: dense)
    layer_moe_params: np.ndarray | None = None  # (L,)
    expert_params: float = 0.0  # one expert MLP
    router_params: float = 0.0  # one MoE layer's router
    num_experts: int = 0
    experts_per_token: int = 0
    layer_moe_flops_per_token: np.ndarray | None = None  # (L,) router + k experts, forward
    message_bytes: int = MESSAGE_BYTES  # bytes an element of an activation or gradient takes on the wire

    def experts_read(self, samples) -> np.ndarray | float:
        """Experts one decode step reads in a MoE layer for `samples` tokens: each token picks k of
        E, so E·(1 - (1 - k/E)^samples) distinct ones in expectation (uniform routing)."""
        E, k = self.num_experts, self.experts_per_token
        return E * (1.0 - (1.0 - k / E) ** np.asarray(samples, float)) if E else 0.0

    @property
    def lora(self) -> bool:
        return self.layer_adapter_params > 0

    @property
    def prefix_params(self) -> np.ndarray:
        return np.concatenate([[0.0], np.cumsum(self.layer_params)])


def mean_keys_per_query(seq_len: int, window: int, causal: bool) -> float:
    """How many keys each query attends to on average (causal halves a full square)."""
    if not causal:
        return float(min(seq_len, window) if window else seq_len)
    # The mean of min(p, window) over positions p = 1..seq_len, in closed form: a 16M-token
    # context on 1024 layers must not build a 16M-entry array per layer.
    w = min(window, seq_len) if window else seq_len
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def model_costs(spec: ModelSpec, work: Workload) -> ModelCosts:
    if work.seq_len > spec.max_seq_len:
        raise PlanError(f"seq-len {work.seq_len} is over the model's maximum of {spec.max_seq_len}")
    if work.task == "infer" and work.seq_len + work.new_tokens > spec.max_seq_len:
        raise PlanError(f"seq-len {work.seq_len} + {work.new_tokens} new tokens is over the model's "
                        f"maximum of {spec.max_seq_len}")
    h, hd, nh, kv, ff = spec.hidden_size, spec.head_dim, spec.num_heads, spec.num_kv_heads, spec.intermediate_size
    L, S = spec.num_layers, work.seq_len
    b = DTYPE_BYTES[work.dtype]
    train = work.task == "train"

    mlp_in = 2 if spec.mlp == "gated" else 1
    matmul_params = h * hd * (2 * nh + 2 * kv) + h * ff * (mlp_in + 1)  # q, k, v, o, mlp
    ff_token = ff  # FFN width a token passes through
    moe = np.array([bool(spec.num_experts) and i not in spec.dense_layers for i in range(L)])
    expert_params = h * (spec.expert_intermediate_size or ff) * (mlp_in + 1) if spec.num_experts else 0
    if spec.num_experts:  # MoE: memory holds every expert (num_params); a token runs the router and k experts
        moe_layers = L - len(spec.dense_layers)
        ff_token = spec.experts_per_token * (spec.expert_intermediate_size or ff)
        active_ffn = moe_layers * (h * spec.num_experts + h * ff_token * (mlp_in + 1)) \
            + (L - moe_layers) * h * ff * (mlp_in + 1)
        matmul_params = h * hd * (2 * nh + 2 * kv) + active_ffn / L  # mean over layers
    lora = train and work.lora_rank is not None
    # rank * (in + out) for each of q, k, v, o, the MLP's input projections and down (alloy.model.lora's defaults)
    adapter_params = (work.lora_rank * ((h + nh * hd) * 2 + (h + kv * hd) * 2 + (h + ff) * (mlp_in + 1))
                      if lora else 0)
    # Layer params without embeddings: total minus embeddings/head, spread evenly.
    non_layer = spec.vocab_size * h * (1 + (not spec.tie_embeddings and spec.causal))
    layer_param_count = (spec.num_params() - non_layer) / L
    windows = [spec.layer_window(i) for i in range(L)]

    # Forward FLOPs per token: 2 per matmul weight, plus QK^T and AV (2 * 2 * heads * head_dim per key).
    fwd_flops_per_token = np.array([
        2 * matmul_params + 4 * nh * hd * mean_keys_per_query(S, w, spec.causal) for w in windows
    ])
    # Backward is twice the forward; checkpointing recomputes the forward once more.
    step_factor = (4 if work.checkpointing else 3) if train else 1
    # LoRA: a frozen weight needs no weight gradient, so its backward is one matmul, not two (the
    # attention scores' backward stays two); the adapters' own matmuls are rank-thin, counted at 3x.
    frozen_saving = 2 * matmul_params if lora else 0
    head_factor = step_factor - 1 if lora else step_factor
    # A float: times step_factor * S it can pass int64 (vocab 4M x hidden 64k x 16M tokens).
    head_flops_per_token = 2.0 * h * spec.vocab_size if spec.causal else 0.0

    # Tensors a layer keeps for its backward, in elements per token: both norms' inputs and
    # outputs, q k v, the attention output, and the MLP's up/gate, activation and product.
    # RoPE writes rotated copies of q and k, which the backward keeps too.
    act_elems = 4 * h + 2 * nh * hd + 2 * kv * hd + (4 if spec.mlp == "gated" else 2) * ff_token
    if spec.positions == "rope":
        act_elems += nh * hd + kv * hd
    full_act_bytes = act_elems * b * S
    if train:
        kept_act = h * b * S if work.checkpointing else full_act_bytes
        # Checkpointing rebuilds one layer's activations at a time during backward.
        peak = full_act_bytes if work.checkpointing else 0.0
    else:
        kept_act, peak = 0.0, full_act_bytes  # inference keeps nothing between layers

    context = S + work.new_tokens
    kv_per_token = 2 * kv * hd * KV_BYTES.get(work.dtype, b)
    kv_tokens = [min(context, w) if w else context for w in windows]
    mean_ctx = [min(S + work.new_tokens / 2, w) if w else S + work.new_tokens / 2 for w in windows]

    param_state_bytes = (2 * b + (MASTER_WEIGHT_BYTES if b < 4 else 0) + ADAMW_STATE_BYTES) if train else b
    adapter_state_bytes = param_state_bytes if lora else 0
    if lora:  # the runtime keeps weights in fp32 and autocasts; a frozen one is that copy alone
        param_state_bytes = max(b, MASTER_WEIGHT_BYTES)
    # QLoRA quantizes every linear of a block (alloy.model.lora.quantize_base): all of a layer's
    # parameters but its norms' (at most 4 h), and the head and embeddings stay as they are
    quant_saving = ((layer_param_count - 4 * h) * (param_state_bytes - QUANT_BYTES[work.quantize_base])
                    if lora and work.quantize_base else 0.0)
    ones = np.ones(L)
    # What the runtime sends, as it sends it: training keeps fp32 master weights and an fp32
    # residual stream under autocast, so activations, their gradients and the weight gradients
    # travel in fp32 (alloy.runtime.engine); decoding sends hidden states in its activation dtype
    # (bf16 or fp16 as asked, else fp32: int8 and block formats are weights only).
    message_bytes = MESSAGE_BYTES if train else (b if work.dtype in ("bf16", "fp16") else MESSAGE_BYTES)
    return ModelCosts(
        num_layers=L, hidden_size=h, vocab_size=spec.vocab_size, dtype_bytes=b,
        param_state_bytes=param_state_bytes,
        layer_params=layer_param_count * ones,
        layer_step_flops_per_sample=S * (step_factor * fwd_flops_per_token - frozen_saving + 6 * adapter_params),
        layer_act_bytes_per_sample=kept_act * ones,
        layer_peak_bytes_per_sample=peak * ones,
        layer_kv_bytes_per_sample=np.array([t * kv_per_token for t in kv_tokens]) * (not train),
        layer_decode_flops_per_sample=np.array(
            [2 * matmul_params + 4 * nh * hd * c for c in mean_ctx]) * (not train),
        layer_kv_read_bytes_per_sample=np.array([c * kv_per_token for c in mean_ctx]) * (not train),
        embed_params=spec.num_params() - layer_param_count * L - (0 if spec.tie_embeddings or not spec.causal
                                                                  else spec.vocab_size * h),
        head_params=spec.vocab_size * h if spec.causal else 0,
        tied=spec.tie_embeddings,
        # Prefill needs logits for the last position only.
        head_step_flops_per_sample=head_factor * (S if train else 1) * head_flops_per_token,
        # Train: logits and their gradient for every position; infer: the last position only.
        head_peak_bytes_per_sample=(TRAIN_LOGITS_COPIES * S if train else 1) * spec.vocab_size * LOGITS_BYTES
        * spec.causal,
        head_decode_flops_per_sample=head_flops_per_token * (not train),
        boundary_bytes_per_sample=S * h * message_bytes,
        boundary_decode_bytes_per_sample=h * message_bytes * (not train),
        total_param_bytes=(L * adapter_params if lora else spec.num_params()) * message_bytes,
        layer_adapter_params=float(adapter_params),
        adapter_state_bytes=adapter_state_bytes,
        layer_quant_saving_bytes=float(quant_saving),
        layer_moe_params=moe * float(h * spec.num_experts + spec.num_experts * expert_params),
        expert_params=float(expert_params), router_params=float(h * spec.num_experts),
        num_experts=spec.num_experts, experts_per_token=spec.experts_per_token,
        layer_moe_flops_per_token=moe * 2.0 * (h * spec.num_experts + spec.experts_per_token * expert_params),
        message_bytes=message_bytes,
    )
