"""A Q8_0 model's greedy tokens equal llama.cpp's on the same GGUF file (issue 21).

bench/llama_parity.py builds a small Llama from an integer hash (the same floats on every machine)
and ran llama.cpp on it; its figures are held here, so this test needs no llama.cpp:
- RECORDED_SHA256: the tensor data of llama-quantize's Q8_0 file of Alloy's F32 export. Alloy's
  own `alloy export --dtype q8_0` must write exactly these bytes: then Alloy decodes the file
  llama.cpp decoded.
- LLAMA_CPP_TOKENS: llama-server's greedy continuation (/completion, temperature 0) of PROMPT from
  that file; Alloy, decoding the file in q8_0 (GGUF blocks, int8 activations, the fused step),
  must give the same NEW tokens. (The model's head favours a fixed successor of each token so no
  step is a near-tie; on a plain random model both programs' F32 greedy runs agreed for all 40
  tokens, while in Q8_0 each left its own F32 path where the top two logits were 0.2 % apart.)
Recorded 2026-12-06 on machine B (Intel Xeon, AVX-512 VNNI/BF16, AMX) with llama.cpp 0c1e570
(llama-cpp-python 0.3.36's vendored copy, GGML_NATIVE=OFF, AVX2/AVX-512/VNNI on):
`LLAMA_BENCH=/tmp/llsrc/build2/bin/llama-bench python -m bench.llama_parity`.
"""

from __future__ import annotations

import pytest
import torch

import alloy
from alloy.cli import main
from alloy.infer import generate
from alloy.infer.optimize import prepare
from bench.llama_parity import NEW, PROMPT, save_hf, tensor_data_sha256

pytest.importorskip("gguf")

RECORDED_SHA256 = "05c6e8e6f11e206f1b69f082a9c8241d22b3c42df9e33276c5c9bbab9efdf288"
LLAMA_CPP_TOKENS = [38, 269, 286, 85, 278, 29, 206, 165, 198, 109, 126, 245, 118, 189, 46, 5, 38, 269, 286, 85, 278, 29,
                    206, 165, 198, 109, 126, 245, 118, 189, 46, 5, 38, 269, 286, 85, 278, 29, 206, 165]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    hf = save_hf(root / "hf")
    out = root / "alloy-q8_0.gguf"
    assert main(["export", str(hf), "--format", "gguf", "--dtype", "q8_0", "--out", str(out)]) == 0
    return out


def test_alloys_q8_0_export_is_llama_quantizes_file(exported):
    assert tensor_data_sha256(exported) == RECORDED_SHA256


def test_greedy_tokens_equal_llama_cpps_for_40_tokens(exported):
    model = prepare(alloy.load(exported), "q8_0")
    ids = PROMPT[:]
    margins = []
    with torch.no_grad():  # no near-ties: each step's top token leads by a margin far above rounding
        for token in LLAMA_CPP_TOKENS:
            logits = model(torch.tensor([ids]))[0, -1]
            top = logits.topk(2).values
            margins.append(float(top[0] - top[1]) / float(logits.abs().max()))
            ids.append(token)
    assert min(margins) > 0.02, min(margins)  # 7.7 % of the logits' range at the closest step here
    got = generate(model, [PROMPT], max_new_tokens=NEW, eos_ids=())[0].tokens
    assert len(LLAMA_CPP_TOKENS) == NEW and got == LLAMA_CPP_TOKENS
