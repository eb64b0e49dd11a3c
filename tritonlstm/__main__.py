"""`python -m tritonlstm`: the environment and a self-check of the Triton kernels (exit 1 if it fails)."""

import os
import sys

import torch

if not torch.cuda.is_available():
    # Must happen before the kernels are loaded: without a GPU they run on Triton's CPU interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tritonlstm.selfcheck import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(0 if run() else 1)
