"""Offline compression: model -> model transforms (quantization, ...)."""
