"""saat-dist: Semantic-Aware Adversarial Training (SAAT) for deep hashing.

Package map, in layers (a module imports only its own layer and those
listed before it; ``docs/design.md``, checked by ``tests/test_layers.py``):

  keyed_random, device, progress, console,     random draws keyed by item; one device choice; progress lines;
  config_fields, checkpoint, optimizers         the log level and library noise; config section types; atomic writes;
                                                torch's Adam and SGD without importing torch._dynamo
  metrics/, hashing/, mainstay, comm/, data/    retrieval metrics; hash losses; mainstay codes and the CodeBank;
                                                collectives, bank sync, synced BatchNorm; shards, decoding, the global order
  models/                                       hash models on torchvision backbones, the adapter for any logits module,
                                                model.factory; the model section and model files
  attacks/                                      every attack, one file each (function, config section, registry entries)
  training/steps, optim, encode, checkpointing  the step primitives, optimizers and schedules, encoding, local checkpoints
  defences/                                     every defence, one file each (config section, step, registry entry)
  config, stages                                the typed config tree; stages as values
  training/ (trainer, backend), monitoring/     the one training loop; the Prometheus exporter, TensorBoard/MLflow
  evaluation/                                   the one evaluation pipeline, the library call, tables, leaderboard, reports
  runner                                        one stage value in this process
  distributed/                                  Ray Train driver and worker, the DeepSpeed backend, Ray checkpoints
  pipeline, experiment                          the protocol's stages (one in-process-or-Ray dispatch); the grid
  cli, bench                                    the `saat-dist` command; benchmarks

Library use: ``saat_dist.evaluate_robustness(model, query, database, eps=...)``
(``evaluation/robustness.py``) and ``saat_dist.as_hash_model(module)``
(``models/adapter.py``), loaded on first use: ``import saat_dist`` stays
light and the package root imports no layer above its own.
"""

import importlib

__version__ = "0.1.0"

_LAZY = {"evaluate_robustness": "saat_dist.evaluation.robustness", "as_hash_model": "saat_dist.models.adapter"}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'saat_dist' has no attribute {name!r}")
