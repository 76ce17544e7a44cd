"""Distributed parts: collectives, code-bank sync, DeepSpeed set-up, the Ray
Train worker function and the driver. Nothing here knows hashing losses."""
