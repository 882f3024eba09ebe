"""Small helpers with no torch.distributed dependency (NVTX ranges)."""
