"""Data: the DeepHash list format, WebDataset shards, demo data, streaming."""
