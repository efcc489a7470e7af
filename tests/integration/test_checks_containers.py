"""Checks before joining with real containers: the demo's benchmark, its demo data pushed to the bus's object store
with `assay benchmark register --demo-data`, fetched, checked and prepared by the real preparator at the
committee's own site worker, then each model run on it in the sandbox with the real evaluator. A working model's
metrics reach the approver; a model that crashes is FAILED with the reason, refused without --override."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from assay.demo.build import BASE_IMAGE, build_demo_images
from assay.demo.data import write_demo_raw
from assay.demo.run import benchmark_spec
from contracts import messages as m
from site_worker.containers import DockerRunner
from tests.integration.test_checks_cli import until
from tests.integration.test_consent_cli import cli
from tests.integration.test_images_travel import build
from tests.support.federation import Federation

pytestmark = pytest.mark.docker


async def test_real_containers_check_each_model_on_the_demo_data_before_it_joins(
        federation: Federation, docker_client, tmp_path: Path):  # type: ignore[no-untyped-def]
    fed = federation
    images = build_demo_images(docker_client, tmp_path / "build")
    crashing = build(docker_client, tmp_path / "crashing", BASE_IMAGE,
                     'ENTRYPOINT ["python3", "-c", "import sys; sys.exit(3)"]\n')
    await fed.send(m.RegisterActor(actor_id="committee", role=m.Role.BENCHMARK_OWNER, also=(m.Role.SITE,),
                                   public_key=fed.key("committee").public_key, display_name="committee"), "operator")
    (fed.root / "sites" / "committee").mkdir(parents=True)
    (fed.root / "sites" / "committee" / "policy.toml").write_text('[release]\nrule = "auto"\n')
    await fed.start_site("committee", DockerRunner(docker_client))  # type: ignore[arg-type]
    spec = benchmark_spec("assay-demo/model-reference:1") | {"benchmark_id": "bench", "check_site": "committee"}
    (fed.root / "benchmark.json").write_text(json.dumps(spec))
    cases = write_demo_raw(fed.root / "demo-data")

    code, said = await cli(fed, "benchmark", "register", str(fed.root / "benchmark.json"), "--demo-data",
                           str(fed.root / "demo-data"), "--demo-cases", str(cases), "--as", "committee")
    assert code == 0 and f"{cases} cases" in said, said
    await fed.send(m.ApproveBenchmark(benchmark_id="bench"), "operator")
    await fed.enrol("vendor", m.Role.MODEL_OWNER)
    for model_id, image in (("compact", images.models["compact"]), ("crashing", crashing)):
        await fed.send(m.RegisterModel(model_id=model_id, name=model_id, image=m.ImageRef(digest=image, name="m")),
                       "vendor")
        code, said = await cli(fed, "association", "request", "bench", "--model", model_id, "--as", "vendor")
        assert code == 0, said

    compact = await until(fed, "PASSED", "association", "show", "bench", "--model", "compact", "--as", "committee",
                          timeout_s=240)
    assert "auc 0." in compact and "sensitivity" in compact and "specificity" in compact, compact
    crashed = await until(fed, "FAILED", "association", "show", "bench", "--model", "crashing", "--as", "committee",
                          timeout_s=240)
    assert "the model failed (exit code 3)" in crashed, crashed
    code, said = await cli(fed, "association", "approve", "bench", "--model", "crashing", "--as", "committee")
    assert code == 1 and "--override" in said
    code, said = await cli(fed, "association", "approve", "bench", "--model", "compact", "--as", "committee")
    assert code == 0 and "model compact approved for bench" in said, said
    prepared = list((fed.root / "sites" / "committee" / "jobs" / ".demo").glob("*/ready.json"))
    assert len(prepared) == 1, "the demo data was fetched and prepared once, for both checks"
