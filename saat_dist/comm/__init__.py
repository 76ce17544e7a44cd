"""The communication layer under the training loop and the evaluation:
collectives that also work without a process group, the code bank kept in
step across processes, and BatchNorm over the global batch. Knows nothing
of Ray, DeepSpeed or hashing losses."""
