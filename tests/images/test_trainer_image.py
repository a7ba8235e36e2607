"""The trainer image, run as an image (tests/images/image.py) on the CPU, as the Job's pod runs it:
SmolLM2 and the invoice data from the local S3 server by their manifest and sha256, a LoRA run of a
few steps, the run published back to S3; then the LoraAdapter's merge Job from the same image,
with a q4_k_m GGUF from the llama.cpp quantizer the image compiles. The image is the CUDA build;
with no GPU, torch runs on the CPU. Opt-in: scripts/build-images trainer takes long (README,
docs/air-gapped.md)."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import gguf

from kubetune.storage.location import S3Location
from kubetune.storage.manifest import read_manifest, verify
from kubetune.storage.models import import_model
from kubetune_trainer.samples import invoice_records, write_jsonl
from tests.trainer.recipe_support import run_spec


def test_trainer_image_fine_tunes_smollm2_from_s3_publishes_to_s3_and_merges_to_q4_k_m(
        trainer_image, s3_server, s3_bucket: S3Location, smollm2_dir, shared_tmp):
    assert trainer_image.args == ["kubetune-trainer"] and trainer_image.uid == 65532
    config = s3_server.config
    bucket = s3_bucket.bucket
    revision = import_model(smollm2_dir, f"s3://{bucket}/models/smollm2", config)
    data = shared_tmp / "invoices.jsonl"
    write_jsonl(data, invoice_records(60, 0))
    s3_bucket.put_file("data/invoices.jsonl", data)
    # Paths as the pod sees them: /tmp/spec is this test's directory, bound into the sandbox.
    base_model = {"uri": f"s3://{bucket}/models/smollm2", "revision": revision}
    body = run_spec(Path("/tmp/spec"), Path("/tmp/spec/volumes"), output_uri=f"s3://{bucket}/runs/job",
                    dataset_uri=f"s3://{bucket}/data/invoices.jsonl", storage=True, baseModel=base_model,
                    training={"maxSteps": 4})
    (shared_tmp / "spec.json").write_text(json.dumps(body))
    (shared_tmp / "spec.json").chmod(0o644)
    shared_tmp.chmod(0o777)  # the image's user writes its scratch and progress.json here
    env = {"KUBETUNE_S3_ENDPOINT": f"http://{config.endpoint}", "KUBETUNE_S3_ACCESS_KEY": config.access_key,
           "KUBETUNE_S3_SECRET_KEY": config.secret_key, "KUBETUNE_S3_REGION": config.region or "",
           "KUBETUNE_TERMINATION_LOG": "/tmp/termination-log"}
    _run(trainer_image, ["--spec", "/tmp/spec/spec.json"], env, shared_tmp)

    output = s3_bucket.child("runs/job")
    manifest = read_manifest(output)
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= {f.path for f in manifest.files}
    assert verify(output, manifest) == []
    lineage = manifest.metadata["lineage"]
    assert lineage["baseModelRevision"] == revision
    assert lineage["datasetSha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert manifest.metadata["metrics"]["train"]["steps"] == 4
    progress = json.loads((shared_tmp / "progress.json").read_text())
    assert progress["phase"] == "done" and progress["step"] == 4

    merge = {"baseModel": base_model, "artifactUri": f"s3://{bucket}/runs/job", "gguf": ["q4_k_m"], "name": "invoices"}
    (shared_tmp / "merge.json").write_text(json.dumps(merge))
    (shared_tmp / "merge.json").chmod(0o644)
    _run(trainer_image, ["merge-job", "--spec", "/tmp/spec/merge.json"], env, shared_tmp)
    merged = output.child("merged")
    merged_manifest = read_manifest(merged)
    assert merged_manifest.metadata["gguf"]["models"] == {"q4_k_m": "model-q4_k_m.gguf"}
    assert verify(merged, merged_manifest) == []
    merged.get_file("gguf/model-q4_k_m.gguf", shared_tmp / "model-q4_k_m.gguf")
    file_type = gguf.GGUFReader(shared_tmp / "model-q4_k_m.gguf").get_field("general.file_type")
    assert file_type is not None and file_type.contents() == gguf.LlamaFileType.MOSTLY_Q4_K_M


def _run(image, args: list[str], env: dict[str, str], shared_tmp: Path) -> None:
    """The image's entrypoint with args, as the Job's pod runs it; its output shown if it fails."""
    done = subprocess.run(image.command([*image.args, *args], env=env, binds={shared_tmp: "/tmp/spec"}),
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, (done.stdout + done.stderr)[-6000:]
