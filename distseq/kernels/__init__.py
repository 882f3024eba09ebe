"""Local math kernels: attention, linear attention and the (out, lse) merge; no torch.distributed."""
