"""Shared pytest setup.

* ``@pytest.mark.gpu`` tests are skipped when CUDA is not available.
* Tests run on CPU in fp32 by default; Triton kernels run there under ``TRITON_INTERPRET=1``
  (set by the kernel tests themselves before importing triton code).
* ``one_thread``: a module-scoped fixture that runs torch on one CPU thread (tiny models: thread
  fan-out costs more than the math, and CI machines are shared). A module opts in with
  ``pytestmark = pytest.mark.usefixtures("one_thread")``.
"""

from __future__ import annotations

import specdec  # noqa: F401  -- first: picks the Triton interpreter on CPU before anything imports triton

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
