"""Shared pytest configuration: markers for optional hardware and runtimes."""
import importlib.util

import pytest


def _cuda_skip_reason():
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine (torch.cuda.is_available() is False)"
    return None


def _cupy_skip_reason():
    reason = _cuda_skip_reason()
    if reason:
        return reason
    if importlib.util.find_spec("cupy") is None:
        return "CuPy is not installed (pip install 'cvig-engine[gpu]')"
    return None


def _tensorrt_skip_reason():
    reason = _cuda_skip_reason()
    if reason:
        return reason
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed (pip install 'cvig-engine[tensorrt]')"
    return None


def pytest_configure(config):
    config.addinivalue_line("markers", "requires_cuda: needs a CUDA GPU with torch")
    config.addinivalue_line("markers", "requires_cupy: needs a CUDA GPU and CuPy")
    config.addinivalue_line("markers", "requires_tensorrt: needs a CUDA GPU and TensorRT")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on 2 CPU cores")


_SKIP_REASONS = {
    "requires_cuda": _cuda_skip_reason,
    "requires_cupy": _cupy_skip_reason,
    "requires_tensorrt": _tensorrt_skip_reason,
}


def pytest_collection_modifyitems(config, items):
    cache = {}
    for item in items:
        for marker_name, reason_function in _SKIP_REASONS.items():
            if item.get_closest_marker(marker_name) is None:
                continue
            if marker_name not in cache:
                cache[marker_name] = reason_function()
            if cache[marker_name]:
                item.add_marker(pytest.mark.skip(reason=cache[marker_name]))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread: on a busy 2-core machine two spinning threads are ~50x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
