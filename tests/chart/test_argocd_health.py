"""The Argo CD health checks in charts/kubetune/argocd/, judged by Argo CD's own Lua engine.

The directory is laid out as Argo CD's resource_customizations/ (health.lua, health_test.yaml,
testdata/ per group and kind): the cases a contribution to Argo CD would carry. Our Go driver
(ecosystem/argocd, built by scripts/ecosystem-tools) runs each case through Argo CD's util/lua both
as an argocd-cm customization and as a built-in script, and prints one JSON line per case.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import get_args

import jsonschema
import pytest
import yaml

from kubetune.api.finetunejob import Phase

ROOT = Path(__file__).resolve().parents[2]
ARGOCD = ROOT / "charts" / "kubetune" / "argocd"
CASES = [(kind_dir.name, test["inputPath"], test["healthStatus"])
         for kind_dir in sorted(ARGOCD.glob("kubetune.dev/*"))
         for test in yaml.safe_load((kind_dir / "health_test.yaml").read_text())["tests"]]


@pytest.fixture(scope="module")
def outcomes() -> dict[tuple[str, str], dict]:
    # A cold build of the driver (Argo CD's module graph) takes minutes; a warm cache, none.
    binary = subprocess.run([str(ROOT / "scripts" / "ecosystem-tools"), "build", "argocd-health"], check=True,
                            capture_output=True, text=True, timeout=3600).stdout.strip()
    done = subprocess.run([binary, str(ARGOCD)], capture_output=True, text=True, timeout=60)
    assert done.returncode in (0, 1), done.stderr  # 1: some case differs, which the tests below name
    results = [json.loads(line) for line in done.stdout.splitlines()]
    return {(r["resource"].split("/")[1], r["inputPath"]): r for r in results}


@pytest.mark.parametrize("kind,input_path,expected", CASES, ids=[f"{k}/{Path(p).stem}" for k, p, _ in CASES])
def test_argocd_engine_gives_the_expected_health(outcomes, kind, input_path, expected):
    result = outcomes[(kind, input_path)]
    # argocd-cm customizations run without Lua's standard libraries, built-in scripts with them.
    for mode in ("override", "builtIn"):
        assert result[mode].get("error") is None, f"{mode}: {result[mode]['error']}"
        assert result[mode]["health"] == expected, mode
    assert result["ok"]


def test_every_case_names_its_own_kind_and_every_testdata_file_is_a_case():
    for kind_dir in ARGOCD.glob("kubetune.dev/*"):
        listed = {test["inputPath"] for test in yaml.safe_load((kind_dir / "health_test.yaml").read_text())["tests"]}
        on_disk = {f"testdata/{p.name}" for p in (kind_dir / "testdata").glob("*.yaml")}
        assert listed == on_disk, kind_dir.name
        for path in on_disk:
            obj = yaml.safe_load((kind_dir / path).read_text())
            assert (obj["apiVersion"].split("/")[0], obj["kind"]) == ("kubetune.dev", kind_dir.name), path


def test_every_finetunejob_phase_has_a_case():
    phases = {(yaml.safe_load((ARGOCD / "kubetune.dev" / "FineTuneJob" / p).read_text()).get("status") or {})
              .get("phase") for _, p, _ in (c for c in CASES if c[0] == "FineTuneJob")}
    assert set(get_args(Phase)) <= phases


@pytest.mark.parametrize("kind", ["FineTuneJob", "LoraAdapter"])
def test_testdata_objects_are_valid_against_the_crd(kind):
    """The inputs are what the API server would store: each object fits the CRD's schema."""
    crd = yaml.safe_load((ROOT / "crds" / f"{kind.lower()}s.kubetune.dev.yaml").read_text())
    # OpenAPI v3.0 schemas keep draft 4's boolean exclusiveMinimum/exclusiveMaximum.
    validator = jsonschema.Draft4Validator(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"])
    for path in sorted((ARGOCD / "kubetune.dev" / kind / "testdata").glob("*.yaml")):
        errors = [f"{'.'.join(map(str, e.path))}: {e.message}"
                  for e in validator.iter_errors(yaml.safe_load(path.read_text()))]
        assert not errors, f"{path.name}: {errors}"
