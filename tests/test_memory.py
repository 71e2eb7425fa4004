"""Weights in huge pages (alloy.kernels.memory, alloy.infer.optimize.to_huge_pages): ordinary
tensors to everything that reads them, the same decoded tokens as in 4 KiB pages, a tied head still
one tensor with the token table, and (where Linux gives them) really in huge pages."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from alloy import kernels
from alloy.infer import generate
from alloy.infer.optimize import STREAMED, prepare
from alloy.kernels import memory
from alloy.model import Transformer
from alloy.checkpoint import resolve_spec

needs_thp = pytest.mark.skipif(not memory.huge_pages(), reason="no transparent huge pages here (THP off, or not Linux)")


@pytest.fixture
def no_huge_pages(monkeypatch):
    monkeypatch.setenv("ALLOY_HUGE_PAGES", "0")
    memory.huge_pages.cache_clear()
    yield
    monkeypatch.delenv("ALLOY_HUGE_PAGES")
    memory.huge_pages.cache_clear()


def _anon_huge_bytes(tensor: torch.Tensor) -> int:
    """AnonHugePages of the mapping that holds `tensor`, from /proc/self/smaps."""
    address = tensor.data_ptr()
    text = open("/proc/self/smaps").read()
    for header, body in re.findall(r"^([0-9a-f]+-[0-9a-f]+) [^\n]*\n((?:[A-Z][^\n]*\n)+)", text, flags=re.M):
        low, high = (int(part, 16) for part in header.split("-"))
        if low <= address < high:
            return int(re.search(r"AnonHugePages:\s+(\d+) kB", body).group(1)) * 1024
    raise AssertionError("no mapping holds the tensor")


def test_packed_tensors_are_zeroed_aligned_and_each_its_own_storage(tmp_path):
    specs = [((3, 1000), torch.float32), ((7,), torch.bfloat16), ((600, 4001), torch.uint8), ((0, 5), torch.float32)]
    tensors = memory.packed(specs)
    assert [(tuple(t.shape), t.dtype) for t in tensors] == specs
    for tensor in tensors:
        assert tensor.is_contiguous() and not tensor.any()
        if tensor.numel():
            assert tensor.data_ptr() % memory.ALIGN_BYTES == 0 or not memory.huge_pages()
    # writes stay in their own tensor (no overlap), and each is its own storage for safetensors
    for i, tensor in enumerate(tensors):
        tensor.fill_(i + 1)
    assert [int(t.float().max()) if t.numel() else 0 for t in tensors] == [1, 2, 3, 0]
    assert len({t.untyped_storage().data_ptr() for t in tensors}) == len(tensors)
    save_file({f"t{i}": t for i, t in enumerate(tensors)}, tmp_path / "a.safetensors")
    back = load_file(tmp_path / "a.safetensors")
    assert all(torch.equal(back[f"t{i}"], t) for i, t in enumerate(tensors))


def test_a_packed_tensor_outlives_its_siblings():
    first, second = memory.packed([((1 << 20,), torch.float32), ((1 << 20,), torch.float32)])
    second.fill_(3.0)
    del first
    import gc

    gc.collect()
    assert float(second.sum()) == 3.0 * (1 << 20)


@needs_thp
def test_packed_memory_is_in_huge_pages():
    (tensor,) = memory.packed([((8 << 20,), torch.float32)])  # 32 MiB
    tensor.fill_(1.0)  # first touch: the kernel backs the advised range with huge pages
    assert _anon_huge_bytes(tensor) >= memory.HUGE_PAGE_BYTES


def test_without_huge_pages_packed_is_plain_zeros(no_huge_pages):
    assert not memory.huge_pages()
    (tensor,) = memory.packed([((8 << 20,), torch.float32)])
    assert not tensor.any()


def _model(tied: bool) -> Transformer:
    torch.manual_seed(0)
    # ~9 MB of weights: more than the one huge page below which nothing moves
    spec = resolve_spec("tiny-llama").replace(hidden_size=256, intermediate_size=704, num_layers=3,
                                              tie_embeddings=tied)
    return Transformer(spec).eval()


def _streamed(model) -> list[torch.Tensor]:
    return [getattr(m, name) for m in model.modules() for name in STREAMED.get(type(m), ())
            if getattr(m, name, None) is not None]


@pytest.mark.skipif(not kernels.available(), reason="no compiled kernels on this CPU")
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "q4_0"])
@pytest.mark.parametrize("tied", [False, True])
def test_decoding_from_huge_pages_gives_the_same_tokens(dtype, tied, monkeypatch):
    prompts = [[5, 9, 2, 7], [1, 3, 3, 8]]
    moved = prepare(_model(tied), dtype)
    monkeypatch.setenv("ALLOY_HUGE_PAGES", "0")
    memory.huge_pages.cache_clear()
    try:
        plain = prepare(_model(tied), dtype)
    finally:
        monkeypatch.delenv("ALLOY_HUGE_PAGES")
        memory.huge_pages.cache_clear()
    for a, b in zip(moved.state_dict().values(), plain.state_dict().values()):
        assert torch.equal(a, b)
    with torch.inference_mode():
        ids = torch.tensor(prompts)
        assert torch.equal(moved(ids), plain(ids))
    tokens = [g.tokens for g in generate(moved, prompts, max_new_tokens=12, eos_ids=())]
    assert tokens == [g.tokens for g in generate(plain, prompts, max_new_tokens=12, eos_ids=())]
    streamed = _streamed(moved)
    if memory.huge_pages() and sum(t.numel() * t.element_size() for t in streamed) >= memory.MIN_BYTES:
        assert all(t.data_ptr() % memory.ALIGN_BYTES == 0 for t in streamed)  # moved: each on its own page
    if tied and dtype == "fp32":  # the head streams the token table itself: still one tensor
        assert moved.head.weight.data_ptr() == moved.embed.tok.weight.data_ptr()
    if tied and dtype == "q4_0":  # the token table looks its rows up in the head's blocks
        assert moved.head.blocks.data_ptr() == moved.embed.tok.blocks.data_ptr()
