"""Hash models: F(x; alpha) = tanh(alpha * h(norm(x))), pure PyTorch."""

from saat_dist.models.hash_model import BACKBONES, HashModel, build_hash_model

__all__ = ["BACKBONES", "HashModel", "build_hash_model"]
