"""Triton kernels of arcopo_fast (installed as `arcopo_fast.kernels`; the source folder is top-level kernels/).

One module per kernel family, each with its @triton.jit kernels, launcher and autograd.Function:
  block_attn      KV-cached chunk attention (inference + training form) and full-sequence block-causal
  sampler_step    fused few-step consistency step with in-kernel Philox noise
  neighbour       AR-CoPO neighbour-policy distances and log-softmax
reference.py holds the plain-torch reference of each. Nothing here knows about models or training: callers
go through arcopo_fast.ops, the one place that picks a backend. Importing this package does not import
triton; the kernel modules do.
"""
