"""`kubetune api`: its arguments and its entry point. Imports only argparse at module level, since
the CLI's parser is built for every command."""

from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--auth", choices=("kubernetes", "token", "none"), default=None,
                        help="kubernetes: bearer tokens checked by TokenReview and SubjectAccessReview (default); "
                             "token: one static token from $KUBETUNE_API_TOKEN; none: no authentication")
    parser.add_argument("--catalog", default=None, help="NAMESPACE/NAME of the model catalog ConfigMap "
                        "(default: $POD_NAMESPACE/kubetune-openai-models)")
    parser.add_argument("--files-uri", help="where uploaded files are kept, one prefix per namespace "
                        "(default s3://kubetune-files)")
    parser.add_argument("--output-uri", help="output.uri of the FineTuneJobs the API creates "
                        "(default s3://kubetune-runs)")
    parser.add_argument("--storage-secret", help="the Secret, in each namespace, with the object store's credentials "
                        "for the trainer (default kubetune-storage)")
    parser.add_argument("--default-namespace", help="namespace of /v1/... calls by callers that are not service "
                        "accounts (default: default)")
    parser.add_argument("--max-upload-mib", type=int, help="largest accepted upload, 413 beyond (default 512)")
    parser.add_argument("--local", metavar="STATE", default=None,
                        help="serve a `kubetune local up` stack (its kubeconfig, S3 Secret and a sample catalog); "
                             "auth defaults to a static token, printed if $KUBETUNE_API_TOKEN is unset")


def run_api(args: argparse.Namespace) -> int:
    import asyncio
    import dataclasses
    import logging
    import secrets
    import signal
    from pathlib import Path

    from kubetune.controller.kube import KubeClient, KubeConfig
    from kubetune.openai_api.server import TOKEN_ENV, Settings, make_service, serve
    from kubetune.storage.config import StorageConfig

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def main() -> int:
        token = os.environ.get(TOKEN_ENV)
        if args.local:
            from kubetune.openai_api.local import ensure_catalog, local_settings, stack_storage

            client = KubeClient(KubeConfig.from_kubeconfig(Path(args.local) / "kubeconfig"))
            settings = local_settings()
            storage = await stack_storage(client)
            await ensure_catalog(client)
        else:
            client = KubeClient(KubeConfig.load())
            settings = Settings()
            storage = StorageConfig.from_env()
        given = {"files_uri": args.files_uri, "output_uri": args.output_uri, "storage_secret": args.storage_secret,
                 "default_namespace": args.default_namespace, "auth": args.auth, "catalog": args.catalog,
                 "max_upload_bytes": args.max_upload_mib << 20 if args.max_upload_mib else None}
        settings = dataclasses.replace(settings, **{k: v for k, v in given.items() if v is not None})
        if settings.auth == "token" and not token:
            token = secrets.token_urlsafe(24)
            print(f"API key (set {TOKEN_ENV} to choose one): {token}", flush=True)
        service = make_service(settings, client, storage, token)
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        try:
            await serve(service, args.host, args.port, stop)
        finally:
            await client.close()
        return 0
    return asyncio.run(main())
