"""Triton kernels of tritonlstm, installed as `tritonlstm.kernels`. Plain tensors in, tensors out."""
