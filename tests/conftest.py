"""Suite-wide fixtures. (Keep this file in tests/: a conftest.py at the repository root would put the
source tree, which lacks the compiled kadapt._C, ahead of the installed package.)"""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy machine the thread hand-offs dominate."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
