"""KV-cache generation on the GPU gives the same tokens as generation without the cache, batched
and one prompt at a time (greedy; fp32 checkpoint)."""

import pytest

from tests.helpers import read_json, torchrun
from tests.hf_fixtures import converted_tiny_eve

pytestmark = pytest.mark.gpu


def test_kv_cache_generation_on_gpu(tmp_path, device, on_gpu, corpus):
    model = converted_tiny_eve(tmp_path, corpus["tokenizer"])
    out = tmp_path / "generations.json"
    torchrun("generation_worker.py", 1, ["--load", model["load"], "--tokenizer", model["tokenizer"],
                                         "--images", *model["images"], "--out", out], cuda=on_gpu)
    run = read_json(out)
    assert all(len(tokens) > 0 for tokens in run["cached"])
    assert run["cached"] == run["uncached"]
    assert run["cached"] == run["single"]
