"""What ties scripts/build-images to the Dockerfiles besides buildah running them: each image
starts FROM its BASE build argument, whose default is the Debian release the script debootstraps,
and runs as the non-root user the chart and the Job builder declare."""

from __future__ import annotations

import re

import pytest

from kubetune.controller.jobs import TRAINER_UID
from tests.images.image import REPO

DOCKERFILES = ("operator/Dockerfile", "trainer_image/Dockerfile")


def instructions(path: str) -> list[tuple[str, str]]:
    # Only ARG, FROM and USER are read, none with line continuations: a Dockerfile parser
    # library would add a dependency for three plain lines.
    lines = (REPO / path).read_text().splitlines()
    return [(m[1].upper(), m[2].strip()) for line in lines if (m := re.match(r"^(ARG|FROM|USER)\s+(.*)$", line))]


@pytest.mark.parametrize("path", DOCKERFILES)
def test_dockerfile_builds_on_the_release_the_script_debootstraps_as_the_chart_user(path):
    release = re.search(r"^release=(\w+)$", (REPO / "scripts/build-images").read_text(), re.M)[1]
    steps = instructions(path)
    assert steps[:2] == [("ARG", f"BASE=debian:{release}-slim"), ("FROM", "${BASE}")]
    assert [value for kind, value in steps if kind == "USER"] == [f"{TRAINER_UID}:{TRAINER_UID}"]
    chart_user = re.search(r"runAsUser: (\d+)", (REPO / "charts/kubetune/templates/_helpers.tpl").read_text())[1]
    assert int(chart_user) == TRAINER_UID


def test_trainer_image_compiles_the_llama_cpp_quantizer_the_tests_use():
    """The merge Job's q4_k_m files come from the image's llama.cpp; the GGUF tests judge the one
    scripts/setup-env builds. One version for both, or the tests judge another quantizer."""
    tested = re.search(r"^\s*llama_version=(\S+)$", (REPO / "scripts/setup-env").read_text(), re.M)[1]
    shipped = re.findall(r"llama-cpp-python==(\S+)", (REPO / "trainer_image/Dockerfile").read_text())
    assert shipped == [tested]
