"""Triton kernels only (`@triton.jit` + thin launchers); autograd lives in effir/ops."""
