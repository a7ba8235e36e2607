"""The local stack: a Kubernetes API server, an S3 server, the operator and a kubelet-like executor,
all on 127.0.0.1, so the product runs end to end without a cluster or a GPU."""
