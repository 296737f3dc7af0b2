import os

import pytest
import torch

# CarRacing draws with pygame; tests run headless.
os.environ.setdefault("SDL_VIDEODRIVER", "dummy")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: OpenMP's spinning threads crawl on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_configure(config):
    """Under pytest-xdist (``-n``) each worker keeps to one intra-op thread: two workers on
    two cores, each spinning two OpenMP threads, would crawl."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
