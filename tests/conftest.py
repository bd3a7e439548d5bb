import pytest
import torch


def cuda_ready():
    """True when a GPU is visible and mspcnn was built with the CUDA kernels."""
    if not torch.cuda.is_available():
        return False
    import mspcnn.ops  # noqa: F401

    return torch._C._dispatch_has_kernel_for_dispatch_key("mspcnn::ncc_max", "CUDA")


def pytest_collection_modifyitems(config, items):
    if cuda_ready():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU and mspcnn built with CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
