"""Bad input through the official client (and raw HTTP where the client cannot send it): each is
refused with OpenAI's error shape and a message naming what is wrong, and none leaves a FineTuneJob
or a file behind."""

from __future__ import annotations

import json
from contextlib import asynccontextmanager

import aiohttp
import openai
import pytest

from kubetune.api import API_VERSION
from kubetune.controller.kube import path_for
from kubetune.local.stack import LocalStack
from kubetune.openai_api.local import SAMPLE_MODEL
from kubetune_trainer.samples import invoice_records
from tests.openai_api.conftest import TOKEN, api_server, openai_client, without_token

GOOD = "".join(json.dumps(r) + "\n" for r in invoice_records(8)).encode()
LIMIT = 64 * 1024


@asynccontextmanager
async def stack_and_api(tmp_path):
    # Not a fixture: Kopf, on stopping, cancels every task started after it, and a fixture's
    # teardown runs in such a task.
    async with LocalStack(tmp_path / "stack") as stack:
        async with api_server(stack, max_upload_bytes=LIMIT) as (service, port):
            yield stack, service, port


async def nothing_left(stack: LocalStack, service) -> None:
    assert await stack.client.list(path_for(API_VERSION, "finetunejobs", "default")) == []
    assert service.files.root.list() == []


def bad_line(records: list[dict], line: int, drop: str) -> bytes:
    records[line - 1].pop(drop)
    return "".join(json.dumps(r) + "\n" for r in records).encode()


async def test_bad_uploads_are_refused_and_nothing_is_stored(tmp_path):
    async with stack_and_api(tmp_path) as (stack, service, port):
        await bad_uploads(stack, service, port)


async def bad_uploads(stack: LocalStack, service, port: int) -> None:
    client = openai_client(port)

    with pytest.raises(openai.AuthenticationError):
        await openai_client(port, token="wrong").files.create(file=("a.jsonl", GOOD), purpose="fine-tune")
    status, answer = await without_token(f"http://127.0.0.1:{port}/v1/files")
    assert (status, answer["error"]["code"]) == (401, "invalid_api_key")

    with pytest.raises(openai.APIStatusError) as too_big:
        await client.files.create(file=("big.jsonl", GOOD * (LIMIT // len(GOOD) + 1)), purpose="fine-tune")
    assert too_big.value.status_code == 413
    assert too_big.value.body["message"] == f"the upload is larger than this server's limit of {LIMIT} bytes"

    with pytest.raises(openai.BadRequestError) as purpose:
        await client.files.create(file=("a.jsonl", GOOD), purpose="assistants")
    assert purpose.value.body["param"] == "purpose"
    assert purpose.value.body["message"] == "purpose must be 'fine-tune' on this server, got 'assistants'"

    # The trainer's own messages: file, line, field.
    cases = {
        ("line3.jsonl", bad_line(invoice_records(8), 3, "completion")): "line3.jsonl: line 3: field 'completion': "
                                                                         "is required",
        ("broken.jsonl", GOOD + b'{"prompt": "x", \n'): "broken.jsonl: line 9: invalid JSON (Expecting property "
                                                        "name enclosed in double quotes at column 1)",
        ("empty.jsonl", b"\n"): "empty.jsonl: contains no records",
        ("notes.txt", GOOD): "notes.txt: unsupported file type '.txt'; use one of .jsonl, .json, .parquet, .csv",
        ("chat.jsonl", b'{"messages": [{"role": "user", "content": "hi"}]}\n'):
            "chat.jsonl: line 1: field 'messages': has no assistant message to learn from",
    }
    for file, expected in cases.items():
        with pytest.raises(openai.BadRequestError) as refused:
            await client.files.create(file=file, purpose="fine-tune")
        assert (refused.value.body["message"], refused.value.body["param"]) == (expected, "file")

    for call in (client.files.retrieve, client.files.content, client.files.delete):
        with pytest.raises(openai.NotFoundError) as missing:
            await call("file-0123456789abcdef01234567")
        assert missing.value.body["message"] == "No such file: file-0123456789abcdef01234567"
    assert (await client.files.list()).data == []
    await nothing_left(stack, service)


async def test_bad_job_requests_create_nothing(tmp_path):
    async with stack_and_api(tmp_path) as (stack, service, port):
        await bad_job_requests(stack, service, port)


async def bad_job_requests(stack: LocalStack, service, port: int) -> None:
    client = openai_client(port)
    file = await client.files.create(file=("good.jsonl", GOOD), purpose="fine-tune")
    assert file.bytes == len(GOOD) and file.filename == "good.jsonl" and file.status == "processed"

    async def refused(expected_param: str | None, **body) -> str:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.fine_tuning.jobs.create(**{"model": SAMPLE_MODEL, "training_file": file.id, **body})
        assert caught.value.body["param"] == expected_param, caught.value.body
        return caught.value.body["message"]

    assert (await refused("model", model="gpt-4o-mini")).endswith(f"known models: {SAMPLE_MODEL}")
    assert "no file 'file-nope' in namespace default" in await refused("training_file", training_file="file-nope")
    assert (await refused("hyperparameters.n_epochs", hyperparameters={"n_epochs": "3"})).endswith(
        "hyperparameters.n_epochs: input should be 'auto' or input should be a valid integer")
    assert (await refused("seed", extra_body={"seed": 1.5})).endswith("seed: input should be a valid integer")
    assert "colour: unknown field" in await refused("colour", extra_body={"colour": "blue"})
    assert "is not available" in await refused("method.type", method={"type": "reinforcement"})
    assert "method dpo needs preference pairs" in await refused("training_file", method={"type": "dpo"})
    assert "no file 'file-nope' in namespace default" in await refused("validation_file", validation_file="file-nope")
    pairs = await client.files.create(file=("pairs.jsonl", b'{"prompt": "a", "chosen": "b", "rejected": "c"}\n'),
                                      purpose="fine-tune")
    assert "holds preference pairs" in await refused("validation_file", validation_file=pairs.id)

    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        url = f"http://127.0.0.1:{port}/v1/fine_tuning/jobs"
        for body, status, code in ((b'{"model": "x", ', 400, "invalid_json"), (b"[1, 2]", 400, "invalid_json"),
                                   (b'{"model": "' + b"x" * (2 << 20) + b'"}', 413, "request_too_large")):
            async with http.post(url, data=body, headers={"Content-Type": "application/json"}) as resp:
                answer = await resp.json()
                assert (resp.status, answer["error"]["code"]) == (status, code), answer

    with pytest.raises(openai.NotFoundError):
        await client.fine_tuning.jobs.retrieve("ftjob-missing")
    with pytest.raises(openai.NotFoundError):
        await client.fine_tuning.jobs.cancel("ftjob-missing")
    with pytest.raises(openai.BadRequestError) as namespace:
        await openai_client(port, namespace="Not_A_Namespace").fine_tuning.jobs.list()
    assert namespace.value.body["param"] == "namespace"

    await client.files.delete(file.id)
    await client.files.delete(pairs.id)
    await nothing_left(stack, service)
