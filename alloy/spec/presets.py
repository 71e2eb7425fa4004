"""Named model configs (Hugging Face config.json form), so a spec can be planned without weights."""

from __future__ import annotations

_LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=8192)
_LLAMA3 = dict(model_type="llama", vocab_size=128256, num_key_value_heads=8, head_dim=128,
               max_position_embeddings=131072, rms_norm_eps=1e-5, hidden_act="silu",
               bos_token_id=128000, eos_token_id=[128001, 128008, 128009])

PRESETS: dict[str, dict] = {
    # The demo's model: small enough to train for a few minutes on two CPU cores.
    "tiny-llama": dict(model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=352,
                       num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=True,
                       bos_token_id=1, eos_token_id=2),
    "llama-3.2-1b": _LLAMA3 | dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, head_dim=64, tie_word_embeddings=True,
                                   rope_parameters=_LLAMA3_ROPE | dict(factor=32.0)),
    "llama-3.1-8b": _LLAMA3 | dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, rope_parameters=_LLAMA3_ROPE | dict(factor=8.0)),
    "llama-3.1-70b": _LLAMA3 | dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                                    num_attention_heads=64, rope_parameters=_LLAMA3_ROPE | dict(factor=8.0)),
    "qwen3-0.6b": dict(model_type="qwen3", vocab_size=151936, hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                       max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645),
}
