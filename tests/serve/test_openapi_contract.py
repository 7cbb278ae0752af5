"""Schemathesis over the one OpenAPI document of the ingress (the generate routes and the control plane's routes
it includes), in process with a fake generator, bounded in examples per operation: valid and invalid requests
alike must get no 5xx and no contract failure — every status is one the operation documents, every body and
content type matches what the document says for that status (errors included: one error schema,
`cluster.http.ErrorBody`), every documented response header is sent.

Every failure is collected before the test fails, so one run reports them all; the cases run and failures found
are printed (BENCHMARKS.md records them)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance, response_headers_conformance, response_schema_conformance, status_code_conformance,
)

from cluster.config import ControlPlaneSettings
from cluster.schemas import Quotas
from cluster.service import ControlPlane
from serve.ingress import LocalRateLimiter, create_ingress_app
from serve.schemas import GeneratedImages

EXAMPLES_PER_OPERATION = 12  # per operation and generation mode (valid, invalid)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]


class FakeGenerator:
    async def __call__(self, model_id, call):
        return GeneratedImages(pngs=[b"png"] * call.request.n, seeds=call.request.image_seeds(), width=64, height=64,
                               batch_size=1, timings={"denoise": 0.1})


@pytest.fixture(scope="module")
def contract(tmp_path_factory):
    work = tmp_path_factory.mktemp("contract")
    plane = ControlPlane.open(ControlPlaneSettings(home=work / "home", database_url=f"sqlite:///{work / 'ct2i.db'}",
                                                   artifacts_uri=str(work / "artifacts"), capacity_gpus=1))
    plane.create_tenant("acme", Quotas(generate_rpm=1_000_000))
    keys = {"admin": plane.create_key("admin").key, "tenant": plane.create_key("tenant", "acme").key}
    plane.on_change = lambda _job: None
    app = create_ingress_app(plane, FakeGenerator(), limiter=LocalRateLimiter())
    return app, keys


@pytest.fixture(scope="module")
def api_schema(contract):
    app, _ = contract
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_no_server_error_and_no_contract_failure_over_the_whole_document(api_schema, contract):
    from hypothesis import given

    _, keys = contract
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 20
    cases = 0
    failures: dict[str, str] = {}
    for operation in operations:
        key = keys["admin"] if operation.path.startswith("/v1/admin") else keys["tenant"]
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, suppress_health_check=list(HealthCheck),
                      database=None)
            def call(case):
                nonlocal cases
                cases += 1
                headers = {"Authorization": f"Bearer {key}"}
                headers.update(case.headers or {})
                case.call_and_validate(headers=headers, checks=CHECKS)

            try:
                call()
            except Unsatisfiable:  # an operation with no parameters and no body has no invalid request to make
                assert mode is GenerationMode.NEGATIVE and not operation.body and not operation.query
            except Exception as failure:  # a schemathesis failure group: keep it, go on, report all at the end
                failures[f"{operation.method.upper()} {operation.path} ({mode.value})"] = str(failure)[:2000]
    print(f"schemathesis: {cases} cases over {len(operations)} operations, {len(failures)} failing operations")
    assert not failures, "\n\n".join(f"{name}:\n{text}" for name, text in failures.items())


def test_the_document_covers_the_control_plane_and_serving_routes(api_schema):
    paths = set(api_schema.raw_schema["paths"])
    assert {"/v1/generate", "/v1/images/generations", "/v1/models", "/v1/tunings", "/v1/tunings/{job_id}/events",
            "/v1/adapters", "/v1/admin/tenants", "/v1/admin/keys", "/healthz"} <= paths
    components = api_schema.raw_schema["components"]["schemas"]
    assert {"GenerateBody", "ImagesBody", "ImagesResponse", "ModelList", "TuningSpec", "JobView"} <= set(components)
