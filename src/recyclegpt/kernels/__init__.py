"""Triton kernels for decoding on CUDA: the shared helpers (`common`), the decode attention (`attention`), the fused
few-row products (`linear`) and the draft head (`draft_head`). Each is a torch custom op (opaque to torch.compile)
and runs on the CPU only under Triton's interpreter, for the tests."""
