"""Model export to other runtimes (ONNX)."""
