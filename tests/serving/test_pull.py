"""`kubetune adapters pull` against the real S3 server: a published run's files through its
manifest, each checked against its sha256; a mismatch names the file and leaves nothing of it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from kubetune.cli import main
from kubetune.serving.cli import PullError, pull
from kubetune.storage.manifest import Manifest, describe_dir, publish

ADAPTER_FILES = {"adapter/adapter_config.json", "adapter/adapter_model.safetensors"}
MERGED_FILES = {"merged/config.json", "merged/model.safetensors"}
GGUF_FILES = {"gguf/invoices-f16.gguf", "gguf/Modelfile"}


def publish_run(tmp_path: Path, location, *, gguf: bool = True) -> Path:
    """A run as the trainer publishes one (files first, manifest last): adapter, merged, GGUF,
    and a history file that is no serving part. The local copy, to compare with."""
    run = tmp_path / "published"
    files = {"adapter/adapter_config.json": json.dumps({"r": 8}).encode(),
             "adapter/adapter_model.safetensors": bytes(range(256)) * 300,
             "merged/config.json": b'{"model_type": "llama"}', "merged/model.safetensors": b"\1" * 100_000,
             "history.jsonl": b'{"step": 1}\n'}
    if gguf:
        files |= {"gguf/invoices-f16.gguf": b"GGUF" + b"\2" * 5000, "gguf/Modelfile": b"FROM ./invoices-f16.gguf\n"}
    for rel, data in files.items():
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_bytes(data)
    layout = {"adapter": "adapter", "merged": "merged", "gguf": "gguf" if gguf else None}
    publish(location, Manifest("RunManifest", describe_dir(run), {"layout": layout}), run)
    return run


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def test_pull_downloads_every_serving_part_checked(tmp_path, s3_bucket, store_env, capsys):
    published = publish_run(tmp_path, s3_bucket.child("run"))
    out = tmp_path / "out"
    assert main(["adapters", "pull", f"s3://{s3_bucket.bucket}/run", str(out)]) == 0
    assert files_under(out) == ADAPTER_FILES | MERGED_FILES | GGUF_FILES  # the history is no serving part
    for rel in files_under(out):
        assert (out / rel).read_bytes() == (published / rel).read_bytes()
    assert "6 files of" in capsys.readouterr().out
    # Again: what is there and matches is kept, nothing is downloaded.
    assert main(["adapters", "pull", f"s3://{s3_bucket.bucket}/run", str(out)]) == 0
    assert "(0 bytes downloaded)" in capsys.readouterr().out


@pytest.mark.parametrize("only,expected", [("adapter", ADAPTER_FILES), ("merged", MERGED_FILES),
                                           ("gguf", GGUF_FILES)])
def test_only_one_part(tmp_path, s3_bucket, s3_server, only, expected):
    publish_run(tmp_path, s3_bucket.child("run"))
    entries, written = pull(f"s3://{s3_bucket.bucket}/run", tmp_path / "out", only, s3_server.config)
    assert {e.path for e in entries} == files_under(tmp_path / "out") == expected
    assert written == sum((tmp_path / "out" / rel).stat().st_size for rel in expected)


def test_a_part_the_run_did_not_publish_is_named(tmp_path, s3_bucket, s3_server):
    publish_run(tmp_path, s3_bucket.child("run"), gguf=False)
    with pytest.raises(PullError, match="published no gguf files"):
        pull(f"s3://{s3_bucket.bucket}/run", tmp_path / "out", "gguf", s3_server.config)


def test_a_checksum_mismatch_names_the_file_and_leaves_nothing_of_it(tmp_path, s3_bucket, store_env, capsys):
    publish_run(tmp_path, s3_bucket.child("run"))
    # Same size, other content: only the sha256 can tell.
    s3_bucket.put_bytes("run/merged/model.safetensors", b"\3" * 100_000)
    out = tmp_path / "out"
    assert main(["adapters", "pull", f"s3://{s3_bucket.bucket}/run", str(out), "--only", "merged"]) == 1
    err = capsys.readouterr().err
    assert "merged/model.safetensors" in err and "sha256 mismatch" in err
    assert "model.safetensors" not in {p.name for p in out.rglob("*")}  # no partial, no temporary name
    assert not [p for p in out.rglob("*") if p.name.endswith((".part", ".pulling"))]


def test_a_stale_local_copy_is_replaced(tmp_path, s3_bucket, s3_server):
    published = publish_run(tmp_path, s3_bucket.child("run"))
    out = tmp_path / "out"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_config.json").write_text('{"r": 64}')
    pull(f"s3://{s3_bucket.bucket}/run", out, "adapter", s3_server.config)
    assert hashlib.sha256((out / "adapter" / "adapter_config.json").read_bytes()).hexdigest() == \
        hashlib.sha256((published / "adapter" / "adapter_config.json").read_bytes()).hexdigest()


def test_a_base_model_is_pulled_whole_by_its_model_manifest(tmp_path, s3_bucket, s3_server):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (model / "model.safetensors").write_bytes(b"\4" * 2048)
    publish(s3_bucket.child("base"), Manifest("ModelManifest", describe_dir(model)), model)
    entries, _ = pull(f"s3://{s3_bucket.bucket}/base", tmp_path / "base", None, s3_server.config)
    assert files_under(tmp_path / "base") == {"config.json", "model.safetensors"} == {e.path for e in entries}
    with pytest.raises(PullError, match="--only applies to runs"):
        pull(f"s3://{s3_bucket.bucket}/base", tmp_path / "base", "adapter", s3_server.config)


def test_a_manifest_naming_a_path_outside_the_directory_writes_nothing(tmp_path, s3_bucket, s3_server):
    run = tmp_path / "evil"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "x").write_bytes(b"x")
    entries = describe_dir(run)
    escaping = [type(entries[0])("adapter/../../escaped", entries[0].size, entries[0].sha256)]
    s3_bucket.put_bytes("evil/manifest.json", Manifest("RunManifest", escaping, {"layout": {"adapter": "adapter"}})
                        .to_json())
    with pytest.raises(PullError, match="outside"):
        pull(f"s3://{s3_bucket.bucket}/evil", tmp_path / "out", None, s3_server.config)
    assert not (tmp_path / "escaped").exists()


def test_no_manifest_is_named(tmp_path, s3_bucket, s3_server):
    with pytest.raises(PullError, match="no manifest.json"):
        pull(f"s3://{s3_bucket.bucket}/nothing", tmp_path / "out", None, s3_server.config)


def test_a_merge_jobs_model_is_pulled_beside_the_run(tmp_path, s3_bucket, s3_server):
    run = s3_bucket.child("run")
    publish_run(tmp_path, run, gguf=False)
    # A run without output.merge: no merged files in its manifest, the merge Job adds its own.
    from kubetune.storage.manifest import read_manifest

    manifest = read_manifest(run)
    manifest.files = [f for f in manifest.files if not f.path.startswith("merged/")]
    manifest.metadata["layout"]["merged"] = None
    run.put_bytes("manifest.json", manifest.to_json())
    with pytest.raises(PullError, match="no merged model"):
        pull(f"s3://{s3_bucket.bucket}/run", tmp_path / "none", "merged", s3_server.config)
    model = tmp_path / "merge-job"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"\5" * 4096)
    publish(run.child("merged"), Manifest("ModelManifest", describe_dir(model)), model)
    entries, _ = pull(f"s3://{s3_bucket.bucket}/run", tmp_path / "out", "merged", s3_server.config)
    assert files_under(tmp_path / "out") == {"merged/model.safetensors"} == {e.path for e in entries}
