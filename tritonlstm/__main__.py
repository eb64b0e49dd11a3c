"""`python -m tritonlstm`: the environment and a self-check of the Triton kernels (exit 1 if it fails)."""

from tritonlstm.selfcheck import main

if __name__ == "__main__":
    raise SystemExit(main())
