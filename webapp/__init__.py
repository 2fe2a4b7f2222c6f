"""`rlhf web`: the labeling web app, a client of the rlhf.v1 gRPC API (see docs/WEBAPP.md)."""
