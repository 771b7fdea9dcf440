"""An autouse fixture for modules whose problems are tiny: one intra-op thread.  On a shared 2-core machine under
pytest-xdist, two threads per worker oversubscribe the cores and make small tensor ops several times slower."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
