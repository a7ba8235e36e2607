"""The `kubetune` command line."""

from __future__ import annotations

import argparse
import os
import sys
import zlib
from pathlib import Path


def _cmd_validate(args: argparse.Namespace) -> int:
    from kubetune.api.validation import validate_paths

    checked, findings = validate_paths(Path(p) for p in args.files)
    for finding in findings:
        print(finding, file=sys.stderr)
    if findings:
        print(f"{len(findings)} error(s) in {checked} resource(s)", file=sys.stderr)
        return 1
    print(f"{checked} resource(s) valid")
    return 0


def _generated_files(root: Path) -> dict[Path, str]:
    from kubetune.api.crd import crd_files
    from kubetune.api.reference import splice

    files = crd_files(root)
    readme = root / "README.md"
    files[readme] = splice(readme.read_text(encoding="utf-8"))
    return files


def _cmd_crds_generate(args: argparse.Namespace) -> int:
    root = Path(args.root)
    stale = []
    for path, text in _generated_files(root).items():
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    verb = "out of date" if args.check else "written"
    for path in stale:
        print(f"{verb}: {path}")
    return 1 if (args.check and stale) else 0


def _cmd_operator(args: argparse.Namespace) -> int:
    import kopf

    import kubetune.controller.handlers  # noqa: F401  (registers the handlers)

    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat.JSON if args.log_json else kopf.LogFormat.PLAIN)
    # Peering elects one active replica among several (Kopf's KopfPeering resources); standalone
    # runs without it, for single-replica installs and local stacks.
    priority = args.priority
    if priority is None:
        # Replicas of one Deployment must not share a priority (Kopf freezes them all): derive a
        # stable one from the pod's name.
        priority = zlib.crc32(os.environ.get("POD_NAME", "").encode()) % 10_000 if os.environ.get("POD_NAME") else 0
    kopf.run(standalone=args.standalone, peering_name=None if args.standalone else args.peering, priority=priority,
             clusterwide=not args.namespace, namespaces=args.namespace or (),
             liveness_endpoint=args.liveness)
    return 0


def _cmd_models_import(args: argparse.Namespace) -> int:
    from kubetune.storage.config import StorageConfig
    from kubetune.storage.models import import_model

    try:
        storage = StorageConfig.from_env() if args.uri.startswith("s3://") else None
        revision = import_model(Path(args.dir), args.uri, storage)
    except ValueError as exc:  # not a model directory, a bad URI, incomplete credentials
        print(f"kubetune models import: {exc}", file=sys.stderr)
        return 1
    print(f"imported {args.dir} to {args.uri}; pin it with baseModel.revision: {revision}")
    return 0


def _cmd_adapters_list(args: argparse.Namespace) -> int:
    import asyncio

    from kubetune.controller.adapters import LABEL_ADAPTER, adapters_table
    from kubetune.controller.kube import KubeClient, KubeConfig, path_for

    async def fetch() -> list[dict]:
        client = KubeClient(KubeConfig.load())
        try:
            labels = {LABEL_ADAPTER: args.name} if args.name else None
            return await client.list(path_for("kubetune.dev/v1alpha1", "loraadapters", args.namespace), labels)
        finally:
            await client.close()
    print(adapters_table(asyncio.run(fetch()), production_only=args.production))
    return 0


def _cmd_local_demo(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from kubetune.local.demo import run_demo

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # the S3 server's start-up probes
    os.environ.setdefault("TQDM_DISABLE", "1")  # the model conversion's progress bars
    return asyncio.run(run_demo(Path(args.state), Path(args.file)))


def _cmd_local_serve(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal

    from kubetune.local.demo import prepare_inputs
    from kubetune.local.stack import LocalStack

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def serve() -> None:
        stop = asyncio.Event()
        try:
            async with LocalStack(Path(args.state), api_port=args.port, gpus=args.gpus,
                                  control_plane=args.control_plane) as stack:
                # After the stack is up: Kopf installs its own handlers when the operator starts.
                for sig in (signal.SIGINT, signal.SIGTERM):
                    asyncio.get_running_loop().add_signal_handler(sig, stop.set)
                await asyncio.to_thread(prepare_inputs, stack)
                (stack.state / "ready").write_text(stack.url)
                print(f"local stack up: KUBECONFIG={stack.kubeconfig}", flush=True)
                await stop.wait()
        finally:
            (Path(args.state) / "ready").unlink(missing_ok=True)
    asyncio.run(serve())
    return 0


def _cmd_api(args: argparse.Namespace) -> int:
    from kubetune.openai_api.cli import run_api

    return run_api(args)


def _cmd_local_up(args: argparse.Namespace) -> int:
    from kubetune.local.daemon import start

    return start(Path(args.state), args.port, args.gpus, control_plane=args.control_plane)


def _cmd_local_down(args: argparse.Namespace) -> int:
    from kubetune.local.daemon import stop

    return stop(Path(args.state))


def build_parser() -> argparse.ArgumentParser:
    from kubetune import __version__

    parser = argparse.ArgumentParser(prog="kubetune", description="Declarative LoRA / QLoRA fine-tuning on Kubernetes.")
    parser.add_argument("--version", action="version", version=f"kubetune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    validate = sub.add_parser("validate", help="check FineTuneJob / LoraAdapter manifests offline")
    validate.add_argument("files", nargs="+", help="YAML files or directories")
    validate.set_defaults(run=_cmd_validate)

    crds = sub.add_parser("crds", help="CustomResourceDefinitions").add_subparsers(dest="crds_command", required=True)
    generate = crds.add_parser("generate",
                               help="write crds/, the chart's CRDs and the README reference from the models")
    generate.add_argument("--root", default=".", help="repository root")
    generate.add_argument("--check", action="store_true", help="write nothing; exit 1 if anything is out of date")
    generate.set_defaults(run=_cmd_crds_generate)

    operator = sub.add_parser("operator", help="run the operator (like `kopf run`)")
    operator.add_argument("--namespace", "-n", action="append", default=[],
                          help="watch this namespace (repeatable; glob patterns allowed); default: all namespaces")
    operator.add_argument("--standalone", action="store_true", help="no peering: this is the only replica")
    operator.add_argument("--peering", default="kubetune", help="KopfPeering name shared by the replicas")
    operator.add_argument("--priority", type=int, default=None,
                          help="peering priority of this replica (default: derived from $POD_NAME, else 0)")
    operator.add_argument("--liveness", default=None, help="e.g. http://0.0.0.0:8080/healthz")
    operator.add_argument("--verbose", action="store_true", help="debug logging")
    operator.add_argument("--log-json", action="store_true", help="JSON log lines (for log collectors)")
    operator.set_defaults(run=_cmd_operator)

    models = sub.add_parser("models", help="base models in the object store").add_subparsers(
        dest="models_command", required=True)
    imp = models.add_parser("import", help="upload a local model directory with a manifest (air-gapped clusters); "
                                           "credentials from KUBETUNE_S3_ENDPOINT/ACCESS_KEY/SECRET_KEY")
    imp.add_argument("dir")
    imp.add_argument("uri", help="s3://bucket/prefix")
    imp.set_defaults(run=_cmd_models_import)

    from kubetune.datasets_cli import register as register_datasets
    register_datasets(sub)
    from kubetune.runs_cli import register as register_runs
    register_runs(sub)

    adapters = sub.add_parser("adapters", help="LoraAdapters in the cluster").add_subparsers(
        dest="adapters_command", required=True)
    listing = adapters.add_parser("list", help="versions by adapter name, with stage and phase (kubeconfig)")
    listing.add_argument("name", nargs="?", help="only this adapter name")
    listing.add_argument("--namespace", "-n", default="default")
    listing.add_argument("--production", action="store_true", help="only the version in production")
    listing.set_defaults(run=_cmd_adapters_list)
    from kubetune.serving.cli import register as register_serving
    register_serving(adapters)

    api = sub.add_parser("api", help="serve the OpenAI fine-tuning API (/v1/files, /v1/fine_tuning/jobs) "
                                     "on top of FineTuneJobs")
    from kubetune.openai_api.cli import add_arguments as add_api_arguments
    add_api_arguments(api)
    api.set_defaults(run=_cmd_api)

    bundle = sub.add_parser("bundle", help="write the images, chart, CRDs and optional base models into one "
                                           "checksummed directory for an air-gapped install")
    from kubetune.bundle import add_arguments as add_bundle_arguments
    from kubetune.bundle import run as run_bundle
    add_bundle_arguments(bundle)
    bundle.set_defaults(run=run_bundle)

    local = sub.add_parser("local", help="the local stack: API server, S3, operator, executor on 127.0.0.1")
    local_sub = local.add_subparsers(dest="local_command", required=True)
    for name, run, text in (("up", _cmd_local_up, "start it in the background and write a kubeconfig"),
                            ("serve", _cmd_local_serve, "run it in the foreground"),
                            ("down", _cmd_local_down, "stop a stack started with up"),
                            ("demo", _cmd_local_demo, "a real fine-tune end to end on a fresh stack")):
        cmd = local_sub.add_parser(name, help=text)
        cmd.add_argument("--state", default=".kubetune-local", help="directory for the stack's state")
        if name in ("up", "serve"):
            cmd.add_argument("--port", type=int, default=0, help="API server port (default: any free one)")
            cmd.add_argument("--gpus", type=int, default=0, help="GPUs the executor offers to pods")
            cmd.add_argument("--control-plane", choices=("emulator", "kubernetes"), default="emulator",
                             help="emulator: kubetune's own API server (starts in seconds); kubernetes: etcd, "
                                  "kube-apiserver, kube-controller-manager and kube-scheduler on 127.0.0.1 "
                                  "(built once by scripts/control-plane build), the executor as the node's kubelet")
        if name == "demo":
            cmd.add_argument("--file", default="examples/local/finetunejob.yaml", help="the FineTuneJob to apply")
        cmd.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
