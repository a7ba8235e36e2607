"""The API on the local stack (`kubetune api --local`): the stack's S3 server and Secret, and a
catalog with the sample model the stack preloads (SmolLM2-135M-Instruct at s3://models/smollm2),
trained with LoRA on the CPU like examples/local/finetunejob.yaml.

The local API server has no TokenReview, so the API takes one static token there (auth mode
`token`): whoever holds it acts in every namespace of the stack.
"""

from __future__ import annotations

import yaml

from kubetune.controller.kube import KubeClient, path_for
from kubetune.local.stack import S3_SECRET
from kubetune.openai_api.catalog import CATALOG_KEY
from kubetune.openai_api.server import Settings
from kubetune.storage.config import StorageConfig

CATALOG_NAME = "kubetune-openai-models"
SAMPLE_MODEL = "smollm2-135m-instruct"
SAMPLE_ENTRY = {
    "baseModel": {"uri": "s3://models/smollm2"},
    "description": "SmolLM2-135M-Instruct, LoRA on the CPU (the local stack's sample model)",
    "defaults": {
        "method": "lora",
        "dataset": {"validationSplit": 0.15},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "training": {"maxSteps": 30, "learningRate": 0.002, "maxSeqLength": 128, "batchSize": 2,
                     "warmupRatio": 0.0},
        "resources": {"gpus": 0},
        "output": {"merge": False},
        "checkpointEverySteps": 10,
    },
}


def local_settings(namespace: str = "default") -> Settings:
    return Settings(files_uri="s3://files", output_uri="s3://adapters", storage_secret=S3_SECRET,
                    catalog=f"{namespace}/{CATALOG_NAME}", auth="token", default_namespace=namespace)


def catalog_configmap(namespace: str, models: dict) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": CATALOG_NAME, "namespace": namespace},
            "data": {CATALOG_KEY: yaml.safe_dump(models, sort_keys=False)}}


async def ensure_catalog(client: KubeClient, namespace: str = "default") -> None:
    """The sample catalog, unless the stack already has one (a user's edits are kept)."""
    if await client.get(path_for("v1", "configmaps", namespace, CATALOG_NAME)) is None:
        await client.create(path_for("v1", "configmaps", namespace),
                            catalog_configmap(namespace, {SAMPLE_MODEL: SAMPLE_ENTRY}))


async def stack_storage(client: KubeClient, namespace: str = "default") -> StorageConfig:
    secret = await client.get(path_for("v1", "secrets", namespace, S3_SECRET))
    if secret is None:
        raise RuntimeError(f"the local stack has no Secret {namespace}/{S3_SECRET}: is it up?")
    return StorageConfig.from_secret(secret, S3_SECRET)
