"""Training: data preparation, the (distributed) trainer and its TorchX launch."""
