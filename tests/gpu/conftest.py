"""The GPU tier: every module here is marked `gpu` (pytestmark) and its tests skip without CUDA.
On a GPU machine: `pytest -m gpu tests/gpu`.

EVE_GPU_TIER_ON_CPU=1 runs the tier on the CPU instead (gloo, SDPA only): it checks the tier's own
code before device time is spent on it, and proves nothing about GPUs.
"""

import os

import pytest
import torch

ON_CPU = os.environ.get("EVE_GPU_TIER_ON_CPU") == "1"


@pytest.fixture(scope="session")
def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    if ON_CPU:
        return torch.device("cpu")
    pytest.skip("needs a CUDA device: run `pytest -m gpu tests/gpu` on a GPU machine")


@pytest.fixture(scope="session")
def on_gpu(device) -> bool:
    return device.type == "cuda"


FIRST = ("test_gpu_training.py", "test_gpu_sync.py")


def pytest_collection_modifyitems(config, items):
    """The trainer's tests first (training, save and resume; a step's micro-batches waiting for
    nothing): a device call has a time limit (tools/gpu_check.sh), and the checks that matter most
    must not be the ones it cuts."""
    items.sort(key=lambda item: FIRST.index(item.path.name) if item.path.name in FIRST else len(FIRST))
