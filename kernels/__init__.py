"""Triton kernels of arcopo_fast (installed as `arcopo_fast.kernels`; the source folder is top-level kernels/).

One module per kernel family, each with its @triton.jit kernels, launcher and autograd wiring
(block_attn: torch.library custom ops with register_autograd; the others: autograd.Function or inference only):
  block_attn      KV-cached chunk attention (inference + training form) and full-sequence block-causal
  block_attn_tma  the chunk-attention forward with TMA loads (sm_90+), launched by block_attn on request
  sampler_step    fused few-step consistency step with in-kernel Philox noise
  neighbour       AR-CoPO neighbour-policy distances and log-softmax
  qk_norm_rope    fused q/k RMSNorm + 3D RoPE of the self-attention (inference)
_autotune.py (pruning by the compile report, parallel compiles) and _launch.py are the plumbing they share.
reference.py holds the plain-torch reference of each. Nothing here knows about models or training: callers
go through arcopo_fast.ops, the one place that picks a backend. Importing this package does not import
triton; the kernel modules do.
"""
