"""git-theta plugin: GGUF checkpoints (llama.cpp), quantized tensor types included."""

__version__ = "0.1.0"
