"""Tiny random Hugging Face models, one or more per family, each exercising some knobs."""

from __future__ import annotations

import torch

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
             num_attention_heads=4, max_position_embeddings=64)

# name -> (model_type, config kwargs). Every knob in the issue is exercised by at least one.
CASES: dict[str, tuple[str, dict]] = {
    "llama-gqa": ("llama", SMALL | dict(num_key_value_heads=2)),
    "llama-tied-bias": ("llama", SMALL | dict(num_key_value_heads=4, tie_word_embeddings=True,
                                              attention_bias=True, mlp_bias=True)),
    "llama3-rope": ("llama", SMALL | dict(num_key_value_heads=2, rope_parameters=dict(
        rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
        high_freq_factor=4.0, original_max_position_embeddings=16))),
    "llama-linear-rope": ("llama", SMALL | dict(num_key_value_heads=1, rope_parameters=dict(
        rope_type="linear", rope_theta=10000.0, factor=4.0))),
    "mistral-sliding": ("mistral", SMALL | dict(num_key_value_heads=2, sliding_window=5)),
    "qwen2-bias-sliding": ("qwen2", SMALL | dict(num_key_value_heads=2, tie_word_embeddings=True,
                                                 use_sliding_window=True, sliding_window=5,
                                                 max_window_layers=1)),
    "qwen3-qknorm": ("qwen3", SMALL | dict(num_key_value_heads=2, head_dim=16)),
    "phi3-fused-partial": ("phi3", SMALL | dict(num_key_value_heads=2, pad_token_id=0,
                                               partial_rotary_factor=0.5)),
    "gemma-mqa": ("gemma", SMALL | dict(num_key_value_heads=1, head_dim=16)),
    "gemma2-softcap-sliding": ("gemma2", SMALL | dict(num_key_value_heads=2, head_dim=16, sliding_window=5,
                                                      query_pre_attn_scalar=24, attn_logit_softcapping=3.0,
                                                      final_logit_softcapping=2.0)),
    "gpt2": ("gpt2", dict(vocab_size=96, n_embd=32, n_layer=3, n_head=4, n_positions=64,
                          bos_token_id=0, eos_token_id=0)),
    "neox-parallel-partial": ("gpt_neox", SMALL | dict(rotary_pct=0.25, use_parallel_residual=True,
                                                       bos_token_id=0, eos_token_id=0)),
    "neox-sequential-tied": ("gpt_neox", SMALL | dict(rotary_pct=0.5, use_parallel_residual=False,
                                                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)),
    "bert": ("bert", SMALL | dict(type_vocab_size=2)),
    # Issue 22's architectures: long-context RoPE, Gemma 3, mixtures of experts.
    "llama-yarn": ("llama", SMALL | dict(num_key_value_heads=2, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=16,
        beta_fast=8.0, beta_slow=1.0))),
    "qwen2-yarn-mscale": ("qwen2", SMALL | dict(num_key_value_heads=2, rope_parameters=dict(
        rope_type="yarn", rope_theta=10000.0, factor=8.0, original_max_position_embeddings=8,
        mscale=1.0, mscale_all_dim=0.5, truncate=False))),
    # SEQ (16) stays within original_max_position_embeddings, so these run the short factors;
    # test_architectures runs past it (the long ones).
    "phi3-longrope": ("phi3", SMALL | dict(num_key_value_heads=2, pad_token_id=0, original_max_position_embeddings=32,
                                           rope_parameters=dict(
        rope_type="longrope", rope_theta=10000.0, short_factor=[1.0 + 0.3 * i for i in range(4)],
        long_factor=[2.0 + 1.5 * i for i in range(4)]))),
    "gemma3": ("gemma3_text", SMALL | dict(num_key_value_heads=2, head_dim=16, sliding_window=5,
                                           sliding_window_pattern=2, query_pre_attn_scalar=24,
                                           final_logit_softcapping=2.0, rope_parameters=dict(
        full_attention=dict(rope_type="linear", factor=2.0, rope_theta=1_000_000.0),
        sliding_attention=dict(rope_type="default", rope_theta=10.0)))),
    "mixtral": ("mixtral", SMALL | dict(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
    "qwen3-moe": ("qwen3_moe", SMALL | dict(num_key_value_heads=2, head_dim=16, num_experts=4,
                                            num_experts_per_tok=2, norm_topk_prob=True,
                                            moe_intermediate_size=24, mlp_only_layers=[1])),
    "olmo2": ("olmo2", SMALL | dict(num_key_value_heads=2, pad_token_id=0, eos_token_id=0)),
    "olmoe": ("olmoe", SMALL | dict(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                    norm_topk_prob=False, pad_token_id=0, eos_token_id=0)),
}
DECODERS = [name for name, (kind, _) in CASES.items() if kind != "bert"]
SOFTCAPPED = {"gemma2-softcap-sliding"}


def build_hf(name: str, seed: int = 0, **changes):
    """A random transformers model for case `name` (its config with `changes`), in fp32 eval mode,
    weights perturbed so every norm scale, bias and projection is non-trivial."""
    kind, kwargs = CASES[name]
    return hf_model(kind, kwargs | changes, seed=seed, sharp_attention=name in SOFTCAPPED)


def hf_model(kind: str, config: dict, *, seed: int = 0, sharp_attention: bool = False):
    """A random transformers model of `kind` from `config`, weights perturbed; with
    `sharp_attention`, q and k scaled up so the attention logits pass a softcap."""
    import transformers

    config = transformers.AutoConfig.for_model(kind, **config)
    torch.manual_seed(seed)
    auto = transformers.AutoModel if kind == "bert" else transformers.AutoModelForCausalLM
    model = auto.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.add_(0.1 * torch.randn_like(p))
            if sharp_attention and any(k in pname for k in ("q_proj", "k_proj")):
                p.mul_(6.0)  # large attention logits, so the softcap is active, not decorative
    return model.eval()


def hf_output(model, input_ids, attention_mask=None, token_type_ids=None):
    with torch.no_grad():
        if model.config.model_type == "bert":
            return model(input_ids=input_ids, attention_mask=attention_mask,
                         token_type_ids=token_type_ids).last_hidden_state
        return model(input_ids=input_ids, attention_mask=attention_mask).logits


CHARS = [chr(c) for c in range(32, 128)]  # 96 printable characters: one token each, ids = vocab of SMALL


def char_tokenizer():
    """A tokenizer whose ids are SMALL's vocabulary: one printable character per token."""
    from tokenizers import Tokenizer, decoders, models

    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(CHARS)}, merges=[]))
    tokenizer.decoder = decoders.Fuse()
    return tokenizer
