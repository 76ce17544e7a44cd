"""saat-dist: Semantic-Aware Adversarial Training (SAAT) for deep hashing.

Package map:
  models/    hash models (torchvision backbones, small CNN), pure PyTorch
  hashing/   benign hashing losses (DPH, DPSH, HashNet, CSQ)
  mainstay   mainstay codes (DMFL) and the per-label-set CodeBank
  attacks/   mainstay-code PGD (untargeted / targeted), targets, perceptibility
  training/  benign and SAAT training steps
  metrics/   retrieval metrics: mAP@k, t-mAP, PR curve, precision@N
  data/      DeepHash list format -> WebDataset shards, demo data, streaming
"""

__version__ = "0.1.0"
