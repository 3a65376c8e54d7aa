"""The OpenAPI document tells the truth: each route's real error answers (`{"error"}`, FAILED results as
422), the key schemes, and schemathesis finding nothing the server answers that the document does not
say (keys off and keys on; the real app in-process over ASGI, a fake engine)."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.python.asgi import ASGIClient
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from fluxserve.engine.fake import SleepingEngine

from support.accounts import create_key
from support.app import BASE_URL, SLUG, running_app

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
EXAMPLES_PER_OPERATION = 25
ERROR_REF = {"$ref": "#/components/schemas/Error"}
KEYED = {f"/v1/{SLUG}", f"/v2/{SLUG}", "/v2/requests/{job_id}/status", "/v2/requests/{job_id}",
         "/v2/requests/{job_id}/cancel", "/v2/requests/{job_id}/events", "/v2/media/{key}", "/v1/account",
         "/v1/webhooks/default/secret", "/v1/loras"}


@pytest.fixture(scope="module")
def spec(tmp_path_factory) -> dict:
    with running_app(tmp_path_factory.mktemp("spec"), engine=SleepingEngine(0.0)) as app, app.http() as http:
        return http.get("/openapi.json").json()


def operations(spec: dict):
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            yield path, method, operation


def test_every_operation_documents_its_errors_with_the_error_schema(spec):
    assert spec["components"]["schemas"]["Error"]["properties"] == {"error": {"type": "string"}}
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    for path, method, operation in operations(spec):
        responses = operation["responses"]
        for status in ("421", "500"):
            assert responses[status]["content"]["application/json"]["schema"] == ERROR_REF, (path, status)
        for status, answer in responses.items():
            if status.startswith(("4", "5")) and status not in ("416", "422"):
                assert answer["content"]["application/json"]["schema"] == ERROR_REF, (path, method, status)
        if method == "post":
            assert "415" in responses, path


def test_the_routes_answers_are_the_ones_they_raise(spec):
    paths = spec["paths"]
    assert set(paths[f"/v1/{SLUG}"]["post"]["responses"]) >= {"400", "401", "403", "406", "409", "415", "422",
                                                            "429", "502", "504"}
    assert set(paths[f"/v2/{SLUG}"]["post"]["responses"]) >= {"400", "401", "403", "406", "409", "415", "429", "502"}
    assert "422" not in paths[f"/v2/{SLUG}"]["post"]["responses"]  # v2 answers at once; it never waits for a FAILED
    failed = paths["/v2/requests/{job_id}/status"]["get"]["responses"]["422"]["content"]["application/json"]
    assert failed["schema"] == {"$ref": "#/components/schemas/FailedResult"}
    assert "409" in paths["/v2/requests/{job_id}/cancel"]["post"]["responses"]
    assert "503" in paths["/ready"]["get"]["responses"]
    assert "422" not in paths["/v2/media/{key}"]["get"]["responses"]
    assert "429" in paths[f"/v2/{SLUG}"]["post"]["responses"] and "Retry-After" in (
        paths[f"/v2/{SLUG}"]["post"]["responses"]["429"]["headers"])


def test_the_routes_that_take_a_key_name_its_schemes(spec):
    schemes = spec["components"]["securitySchemes"]
    assert schemes["ApiKey"] == {**schemes["ApiKey"], "type": "apiKey", "in": "header", "name": "x-api-key"}
    assert schemes["Bearer"]["type"] == "http" and schemes["Bearer"]["scheme"] == "bearer"
    for path, _method, operation in operations(spec):
        if path in KEYED:
            assert {"ApiKey": []} in operation["security"] and {"Bearer": []} in operation["security"], path
            assert "401" in operation["responses"], path
        else:
            assert "security" not in operation and "401" not in operation["responses"], path


def test_webhook_events_filter_needs_one_event(spec):
    body = spec["paths"][f"/v2/{SLUG}"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["webhook_events_filter"]["minItems"] == 1


@pytest.mark.parametrize("keys", ["keys off", "keys on"])
def test_schemathesis_finds_nothing(tmp_path, keys):
    """Generated requests (valid and invalid) to every operation: no 5xx, every status, Content-Type and
    body as documented."""
    key = create_key(tmp_path, "fuzzer", credits=1_000_000).key if keys == "keys on" else None
    headers = {"x-api-key": key} if key else {}
    with running_app(tmp_path, engine=SleepingEngine(0.0), sync_timeout_seconds=5) as app, app.http() as http:
        schema = schemathesis.openapi.from_dict(http.get("/openapi.json").json())
        # Requests run in-process over ASGI (schemathesis' client, on the app the helper started).
        client = ASGIClient(app.client.app, base_url=BASE_URL)
        problems: list[str] = []
        seen: set[str] = set()
        for result in schema.get_all_operations():
            operation = result.ok()
            for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):

                @given(case=operation.as_strategy(generation_mode=mode))
                @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
                          phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
                def call(case):
                    response = case.call_and_validate(session=client, base_url=BASE_URL, headers=headers,
                                                      checks=CHECKS)
                    seen.add(f"{case.operation.label} {response.status_code}")

                try:
                    call()
                except Unsatisfiable:
                    pass  # nothing in this operation can be made invalid (its parameters take any string)
                except (Exception, BaseExceptionGroup) as exc:  # every operation's findings, not only the first
                    problems.append(f"{operation.label} ({mode}): {exc}")
    print("\n".join(sorted(seen)))
    assert problems == [], "\n\n".join(problems)
