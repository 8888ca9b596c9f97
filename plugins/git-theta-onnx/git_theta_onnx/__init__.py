"""git-theta plugin: ONNX models, initializers stored as tensors, byte-identical checkout."""

__version__ = "0.1.0"
