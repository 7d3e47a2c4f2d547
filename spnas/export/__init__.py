"""Shipping a trained detector: ONNX and TorchScript programs, a parity gate against PyTorch,
a model card and the label map (``spnas export``)."""
