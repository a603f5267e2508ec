"""Where the Triton kernel tests run. Import it before anything imports triton: it sets TRITON_INTERPRET=1
unless the caller chose (kernels then run on CPU tensors in the interpreter; `TRITON_INTERPRET=0 pytest`
on a GPU machine runs them compiled, on CUDA).

    from triton_env import DEVICE, INTERPRET, require_kernel_device
    require_kernel_device()      # at module level: skips cleanly where neither can run
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
DEVICE = "cpu" if INTERPRET else "cuda"


def require_kernel_device() -> None:
    pytest.importorskip("triton")
    if not INTERPRET and not torch.cuda.is_available():
        pytest.skip("Triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)
