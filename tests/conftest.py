"""Shared fixtures: tiny offline pipelines (random weights) and quiet libraries."""
import logging
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")
logging.getLogger("diffusers").setLevel(logging.ERROR)

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))



@pytest.fixture
def one_thread():
    """Tiny models run fastest single-threaded (and 2-core CI machines are shared).

    Test modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY = ["tiny-pixart", "tiny-sd15", "tiny-sdxl", "tiny-dit", "tiny-flux", "tiny-sd3", "tiny-hunyuan"]


@pytest.fixture(scope="session")
def tiny_pipes():
    """Cache of tiny pipelines by alias (built lazily, fp32, CPU)."""
    from attnprobe.core.registry import load_pipeline

    cache = {}

    def get(alias):
        if alias not in cache:
            cache[alias] = load_pipeline(alias)[0]
        return cache[alias]

    return get
