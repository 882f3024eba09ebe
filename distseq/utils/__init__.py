"""Small helpers below every other layer: NVTX ranges and the torch-release compatibility shims."""
