from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kubetune.api.uris import StorageUri, parse_uri, uri_problem

segment = st.from_regex(r"[A-Za-z0-9_~+=@,-][A-Za-z0-9._~+=@,-]{0,20}", fullmatch=True)


@given(bucket=st.from_regex(r"[a-z0-9][a-z0-9-]{1,20}[a-z0-9]", fullmatch=True),
       parts=st.lists(segment, min_size=0, max_size=5))
def test_s3_uris_round_trip(bucket, parts):
    text = "/".join([f"s3://{bucket}", *parts])
    parsed = parse_uri(text)
    assert parsed == StorageUri("s3", bucket, "/".join(parts))
    assert str(parsed) == text


@given(st.text(max_size=60))
def test_accepted_uris_never_traverse(text):
    if uri_problem(text) is None:
        path = text.partition("://")[2]
        assert ".." not in path.split("/") and "." not in path.split("/")


@pytest.mark.parametrize("uri", ["s3://b/../x", "pvc://c/a/../../etc", "s3://bb/a/./b", "pvc://c/..", "s3://bucket/.."])
def test_traversal_refused(uri):
    assert uri_problem(uri) == "must not contain '.' or '..' path segments"


def test_join_stays_under_prefix():
    assert str(parse_uri("s3://runs/ns/job").join("attempt-0", "adapter/")) == "s3://runs/ns/job/attempt-0/adapter"
