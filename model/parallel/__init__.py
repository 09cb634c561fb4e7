"""The only part of `model/` that touches torch.distributed: layouts and collectives applied from outside the math."""
