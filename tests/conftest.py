"""Test-wide hooks: tests marked `gpu` need CUDA and are skipped without it; tiny HF models."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """case name -> (HF model, directory it was saved to with save_pretrained), built once per module."""
    from hf_cases import build_hf

    cache = {}

    def get(name):
        if name not in cache:
            model = build_hf(name)
            directory = tmp_path_factory.mktemp(name)
            model.save_pretrained(directory)
            cache[name] = (model, directory)
        return cache[name]

    return get
