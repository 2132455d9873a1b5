"""Expert-GEMM kernels: a pure-PyTorch reference for every op, Triton kernels for CUDA."""
