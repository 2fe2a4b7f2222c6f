"""Contracts shared by the server and the trainer: the store, identities and splits,
the checkpoint format, and the models. Nothing here imports grpc, vllm or the trainer."""
