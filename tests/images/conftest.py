from __future__ import annotations

import shutil

import pytest

from tests.images.image import layout, shared_dir, unpack


def _unpacked(name: str):
    root = shared_dir(f"kubetune-{name}-image-")
    try:
        yield unpack(layout(name), root / "bundle")
    finally:
        shutil.rmtree(root)


@pytest.fixture(scope="session")
def operator_image():
    yield from _unpacked("operator")


@pytest.fixture(scope="session")
def trainer_image():
    yield from _unpacked("trainer")


@pytest.fixture
def shared_tmp():
    """A fresh directory the image's user can reach (pytest's tmp_path is root's alone)."""
    path = shared_dir("kubetune-image-test-")
    yield path
    shutil.rmtree(path)
