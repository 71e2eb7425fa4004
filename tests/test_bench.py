"""The benchmark harness: ratios pair by pair, and a --quick smoke run end to end (no speed asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import harness

ROOT = Path(__file__).resolve().parents[1]


def test_ratios_are_taken_pair_by_pair_not_from_medians():
    samples = {"a": [{"t": 10.0}, {"t": 30.0}, {"t": 20.0}], "b": [{"t": 5.0}, {"t": 30.0}, {"t": 5.0}]}
    summary = harness.summarize(samples, [("a", "b", "t")])
    assert summary["figures"]["a"]["t"] == {"median": 20.0, "min": 10.0, "max": 30.0, "n": 3}
    ratio = summary["ratios"]["a/b:t"]
    assert ratio["median"] == 2.0 and ratio["min"] == 1.0 and ratio["max"] == 4.0  # pairs: 2, 1, 4
    assert "| a/b:t | 2.000 | 1.000 – 4.000 |" in harness.markdown("x", summary)


def test_plan_benchmark_quick_runs_and_reports_sane_numbers(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench", "plan", "--quick", "--json"], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(proc.stdout)
    headline = record["headline"]
    assert 0 < headline["planner_s_8"] < 60 and 0 < headline["planner_s_64"] < 600
    assert all(v >= 0.999 for k, v in headline.items() if k.startswith("gain_")), headline
    assert record["environment"]["commit"] and record["samples"]["alloy"]


def test_quality_benchmark_quick_trains_and_scores_each_precision():
    import math

    from bench.quality import llama_tool

    proc = subprocess.run([sys.executable, "-m", "bench", "quality", "--quick", "--json"], capture_output=True,
                          text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(proc.stdout)
    headline, sample = record["headline"], record["samples"]["alloy"][0]
    # a trained byte-level model beats the uniform 256-way guess; rounding weights costs little
    assert 1 < headline["ppl_fp32"] < 256
    for key in ("ppl_bf16_operands", "ppl_int8_weights", "ppl_bf16_all"):
        assert abs(headline[key] / headline["ppl_fp32"] - 1) < 0.05, (key, headline)
    # the GGUF block formats (quick widths are multiples of 256, so Q4_K applies too)
    for fmt, bound in (("q8_0", 0.05), ("q4_0", 0.25), ("q4_1", 0.25), ("q4_k", 0.25)):
        ppl = headline[f"ppl_{fmt}"]
        assert math.isfinite(ppl) and abs(ppl / headline["ppl_fp32"] - 1) < bound, (fmt, headline)
    # gguf-py's decode of the same GGUF blocks, always there (Q4_K only with llama-quantize: gguf.quants
    # cannot make it), scores what Alloy scores: same bytes, same fp32 arithmetic up to summation order
    ggufpy = [f for f in ("fp32", "q8_0", "q4_0", "q4_1", "q4_k") if f"ppl_half_ggufpy_{f}" in headline]
    assert ggufpy[:4] == ["fp32", "q8_0", "q4_0", "q4_1"], headline
    for fmt in ggufpy:
        assert abs(headline[f"ratio_alloy_{fmt}_vs_ggufpy_{fmt}"] - 1) < 1e-3, (fmt, headline)
    if llama_tool("llama-perplexity", "LLAMA_PERPLEXITY") is None:
        assert sample["baseline"].startswith("gguf-py") and not any("llamacpp" in k for k in headline), sample
        assert any("no llama-perplexity" in why for why in sample["left_out"]), sample["left_out"]
    else:  # the bound, for every format llama.cpp ran (a crash is listed in left_out)
        llamacpp = {k: v for k, v in headline.items() if k.startswith("ratio_") and "llamacpp" in k}
        assert llamacpp or sample["left_out"], sample
        assert all(abs(v - 1) < 0.005 for v in llamacpp.values()), llamacpp


def test_report_shows_the_newest_full_size_run(tmp_path, monkeypatch, capsys):
    from bench import report

    monkeypatch.setattr(harness, "RESULTS_DIR", tmp_path)
    summary = harness.summarize({"a": [{"t": 2.0}], "b": [{"t": 1.0}]}, [("a", "b", "t")])
    env = {"date": "2026-11-29", "cpu": "cpu", "cores": 2, "torch": "2.13"}
    for stamp, quick, commit in [("1", False, "old"), ("2", False, "new"), ("3", True, "quick")]:
        record = {"benchmark": "x", "quick": quick, "environment": {**env, "commit": commit},
                  "headline": {"ratio": 2.0}, **summary, "samples": {"a": [{"t": 2.0}], "b": [{"t": 1.0}]}}
        (tmp_path / f"x-{stamp}.json").write_text(json.dumps(record))
    monkeypatch.setattr(sys, "argv", ["report", "x", "y"])
    report.main()
    out = capsys.readouterr().out
    assert "commit new" in out and "commit old" not in out and "quick" not in out
    assert "| a/b:t | 2.000 | 2.000 – 2.000 |" in out and "| ratio | 2 |" in out
    assert "### y\n\n(no full-size result saved yet)" in out


def test_validate_figures_have_readable_keys_and_the_table_comes_from_the_samples():
    from bench import validate
    assert validate.key("offline decode tok/s llama70b petals") == "offline_decode_tok_s_llama70b_petals"
    metric = {"name": "x: y", "predicted": 1.0, "published": 2.0, "error": -0.5, "threshold": "<= 10%",
              "passed": False, "note": "n"}
    out = validate.report({"alloy": [{"metrics": [metric]}]})
    assert "| x: y | 1 | 2 | -0.5 | <= 10% | FAIL | n |" in out
    spread = {"name": "s", "varied": "v", "low": 1.0, "checked": 2.0, "high": 3.0, "published": 4.0, "covers": False,
              "note": "m"}
    out = validate.report({"alloy": [{"metrics": [metric], "sensitivity": [spread]}]})
    assert "| s | v | 1 | 2 | 3 | 4 | no | m |" in out


@pytest.mark.skipif(__import__("alloy.devices", fromlist=["x"]).quota_unavailable_reason() is not None,
                    reason="the hetero benchmark's workers are CPU quota slices (cgroup v1, root)")
def test_hetero_benchmark_quick_runs_every_variant_from_a_fresh_checkout():
    """Smoke test (no speed asserted): slices measured, runtime terms calibrated, Alloy's plan
    verified, every variant run; the figures are there and sane."""
    proc = subprocess.run([sys.executable, "-m", "bench", "hetero", "--quick", "--json"], capture_output=True,
                          text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(proc.stdout)
    headline = record["headline"]
    assert headline["alloy_tokens_per_s"] > 0 and headline["solo_sum_tokens_per_s"] > 0
    assert 0 < headline["efficiency_vs_solo_sum"] <= 1.5 and headline["gain_vs_equal_split"] > 0
    alloy = record["samples"]["alloy"][0]
    assert alloy["chosen"] and len(alloy["trials"]) >= 3
    assert all(t["predicted_step_s"] > 0 for t in alloy["trials"])


def test_lora_benchmark_quick_reports_every_impl_and_finite_ratios():
    """Smoke test (no speed asserted): Alloy's LoRA, its full fine-tuning and transformers + PEFT
    each train at both dtypes, and LoRA trains a small fraction of the parameters."""
    import math

    proc = subprocess.run([sys.executable, "-m", "bench", "lora", "--quick", "--json"], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(proc.stdout)
    figures, ratios = record["figures"], record["ratios"]
    rows = {f"{impl}-{dtype}" for impl in ("alloy-lora", "alloy-qlora", "alloy-full", "peft")
            for dtype in ("fp32", "bf16")}
    assert set(figures) == rows, sorted(figures)
    assert all(f["tokens_per_s"]["min"] > 0 and f["peak_rss_bytes"]["min"] > 0 for f in figures.values())
    lora, full, peft = (figures[f"{impl}-fp32"] for impl in ("alloy-lora", "alloy-full", "peft"))
    assert lora["trainable_params"]["median"] == peft["trainable_params"]["median"]  # same adapters on both sides
    assert lora["trainable_params"]["median"] < 0.2 * full["trainable_params"]["median"]
    assert figures["alloy-qlora-fp32"]["trainable_params"]["median"] == lora["trainable_params"]["median"]
    assert len(ratios) == 12 and all(math.isfinite(s["min"]) and math.isfinite(s["max"]) for s in ratios.values())
    assert all(math.isfinite(v) and v > 0 for v in record["headline"].values()), record["headline"]
