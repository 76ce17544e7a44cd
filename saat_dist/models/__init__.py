"""Hash models: F(x; alpha) = tanh(alpha * h(norm(x))), pure PyTorch; any
module whose forward(x) returns hash logits, through ``as_hash_model``."""

from saat_dist.models.adapter import HashAdapter, as_hash_model, has_hash_interface
from saat_dist.models.hash_model import BACKBONES, HashModel, build_hash_model

__all__ = ["BACKBONES", "HashAdapter", "HashModel", "as_hash_model", "build_hash_model", "has_hash_interface"]
