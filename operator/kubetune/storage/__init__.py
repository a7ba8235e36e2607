"""Object storage (MinIO / any S3 API through the `minio` SDK) and local volumes behind one interface."""
