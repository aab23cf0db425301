"""Compiled matmul kernels the engine uses where numpy's BLAS is slow for its shapes.

`prepacked.PrepackedMatmul` multiplies a few rows by a constant wide matrix (the tied LM head)
through onnxruntime, which packs the matrix once instead of on every call. `onnx_graph`
writes the small ONNX graphs those sessions run.
"""
