"""Backends: IR -> torch (codegen), prototxt, ONNX."""
