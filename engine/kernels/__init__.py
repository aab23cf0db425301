"""Compiled matmul kernels (onnxruntime) behind the forward pass's `Weights.linear(x, W)`.

`blocks` repacks GGUF block formats exactly into the engine's block-affine layout;
`quantized.QWeight` multiplies such matrices (MatMulNBits for a few rows, tile-by-tile
dequantizing and sgemm for long chunks); `prepacked.PrepackedMatmul` multiplies a few rows by
a dense fp32 matrix packed once instead of on every call; `fused.FusedLayers` runs all of a
quantized layer but its attention as one graph (a few rows: decode, drafts, short chunks).
`onnx_graph` writes the small ONNX graphs those sessions run.
"""
