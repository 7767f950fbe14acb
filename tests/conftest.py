"""Suite-wide fixtures. (Keep this file in tests/: a conftest.py at the repository root would put the
source tree, which lacks the compiled kadapt._C, ahead of the installed package.)"""
import os

import pytest
import torch

# Without a GPU, Triton kernels can only run (on CPU tensors) in Triton's interpreter, and Triton
# picks interpreted or compiled kernels when they are defined: the variable must be set before
# kadapt/ops/triton/fused_adapter.py (imported lazily on the first Triton call) or triton itself is
# imported, hence here. It only lets a forced "triton" backend run CPU tensors; "auto" still runs
# the reference on them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy machine the thread hand-offs dominate."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
