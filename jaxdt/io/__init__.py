"""Host-side storage: the safetensors codec, checkpoints, metadata and the run-folder protocol.

Layers, lowest first: `disk` (hashing, durable writes, preflight, fault
points) < `tensorfile` (streaming safetensors writer/reader) < `metadata`,
`checkpoints` < `rundir` (the lock, resume, seal and commit of a run folder).
Nothing here imports JAX's training side.
"""
