"""The `kubetune` command line."""

from __future__ import annotations

import argparse
import sys
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

    # Peering elects one active replica among several (Kopf's KopfPeering resources); standalone
    # runs without it, for single-replica installs and local stacks.
    kopf.run(standalone=args.standalone, peering_name=args.peering, priority=args.priority,
             clusterwide=not args.namespace, namespaces=args.namespace or (),
             liveness_endpoint=args.liveness)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from kubetune import __version__

    parser = argparse.ArgumentParser(prog="kubetune", description="Declarative LoRA / QLoRA fine-tuning on Kubernetes.")
    parser.add_argument("--version", action="version", version=f"kubetune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    validate = sub.add_parser("validate", help="check FineTuneJob / LoraAdapter manifests offline")
    validate.add_argument("files", nargs="+", help="YAML files or directories")
    validate.set_defaults(run=_cmd_validate)

    crds = sub.add_parser("crds", help="CustomResourceDefinitions").add_subparsers(dest="crds_command", required=True)
    generate = crds.add_parser("generate", help="write crds/, the chart's CRDs and the README reference from the models")
    generate.add_argument("--root", default=".", help="repository root")
    generate.add_argument("--check", action="store_true", help="write nothing; exit 1 if anything is out of date")
    generate.set_defaults(run=_cmd_crds_generate)

    operator = sub.add_parser("operator", help="run the operator (like `kopf run`)")
    operator.add_argument("--namespace", "-n", action="append", default=[],
                          help="watch this namespace (repeatable; glob patterns allowed); default: all namespaces")
    operator.add_argument("--standalone", action="store_true", help="no peering: this is the only replica")
    operator.add_argument("--peering", default="kubetune", help="KopfPeering name shared by the replicas")
    operator.add_argument("--priority", type=int, default=0, help="peering priority of this replica")
    operator.add_argument("--liveness", default=None, help="e.g. http://0.0.0.0:8080/healthz")
    operator.set_defaults(run=_cmd_operator)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
