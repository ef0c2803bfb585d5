"""The OpenAPI schema documents every route and every model: each operation has a summary, a description and typed
answers (errors in OpenAI's format), and each schema and each of its fields has a description."""

from __future__ import annotations

import pytest

from nectar.api.core.config import Settings

EXPECTED = {
    ("post", "/v1/completions"),
    ("post", "/v1/chat/completions"),
    ("get", "/v1/models"),
    ("get", "/v1/models/{model}"),
    ("delete", "/v1/models/{model}"),
    ("post", "/v1/files"),
    ("get", "/v1/files"),
    ("get", "/v1/files/{file_id}"),
    ("get", "/v1/files/{file_id}/content"),
    ("delete", "/v1/files/{file_id}"),
    ("post", "/v1/fine_tuning/jobs"),
    ("get", "/v1/fine_tuning/jobs"),
    ("get", "/v1/fine_tuning/jobs/{fine_tuning_job_id}"),
    ("post", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel"),
    ("get", "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events"),
    ("post", "/v1/accounts"),
    ("get", "/v1/account"),
    ("post", "/v1/account/keys"),
    ("get", "/v1/account/keys"),
    ("delete", "/v1/account/keys/{key_id}"),
    ("put", "/v1/account/address"),
    ("get", "/v1/account/funding"),
    ("post", "/v1/account/deposits/scan"),
    ("get", "/v1/account/deposits"),
    ("post", "/v1/account/faucet"),
    ("get", "/v1/account/usage"),
    ("post", "/v1/admin/accounts/{account_id}/credit"),
    ("get", "/v1/market/swarm"),
    ("get", "/v1/market/stats"),
    ("get", "/v1/market/gateway"),
    ("get", "/v1/nodes/{address}/receipts"),
    ("get", "/v1/nodes/{address}/earnings"),
    ("get", "/v1/nodes/{address}/settlements"),
    ("get", "/v1/nodes/{address}/reputation"),
    ("get", "/monitor"),
    ("get", "/health"),
}


@pytest.fixture(scope="module")
def schema(tmp_path_factory):
    from nectar.api.main import create_app

    app = create_app(Settings(database_url=f"sqlite:///{tmp_path_factory.mktemp('oa') / 'api.db'}"))
    schema = app.openapi()
    from nectar.api.routes import accounts, completions, files, fine_tuning, market, models, monitor

    routers = [
        completions.router,
        models.router,
        files.router,
        fine_tuning.router,
        accounts.router,
        accounts.admin_router,
        market.router,
        monitor.router,
    ]
    routes = {
        (method.lower(), route.path.replace("{model:path}", "{model}"))
        for router in routers
        for route in router.routes
        for method in route.methods - {"HEAD"}
    }
    return schema, routes


def test_every_route_is_in_the_schema(schema):
    schema, routes = schema
    documented = {(method, path) for path, ops in schema["paths"].items() for method in ops}
    assert routes == documented == EXPECTED


def test_every_operation_is_described_with_typed_answers(schema):
    schema, _ = schema
    for path, ops in schema["paths"].items():
        for method, op in ops.items():
            where = f"{method.upper()} {path}"
            assert op.get("summary") and op.get("description"), where
            answers = op["responses"]
            ok = answers.get("200") or answers.get("201")
            assert ok and ok.get("content"), where
            for status, answer in answers.items():
                assert answer.get("description"), (where, status)
                if status.startswith(("4", "5")):
                    assert answer["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/ErrorResponse"
                    }, (where, status)
            for parameter in op.get("parameters", []):
                assert parameter["schema"], (where, parameter["name"])
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["type"] == "http"


def test_every_model_and_field_is_described(schema):
    schema, _ = schema
    components = schema["components"]["schemas"]
    for name in (
        "CompletionRequest",
        "ChatCompletionRequest",
        "CompletionStreamResponse",
        "ChatCompletionStreamResponse",
        "FineTuningJob",
        "ErrorResponse",
        "SwarmView",
        "AccountPublic",
    ):
        assert name in components
    assert "HTTPValidationError" not in components
    for name, definition in components.items():
        assert definition.get("description"), name
        for field, prop in definition.get("properties", {}).items():
            assert prop.get("description"), f"{name}.{field}"
    refs = {value.split("/")[-1] for value in _refs(schema)}
    assert refs <= set(components)


def _refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def test_the_cli_says_what_is_missing(tmp_path):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith(("NECTAR_API_", "NECTAR_INITIAL_PEERS"))}
    env["NECTAR_HOME"] = str(tmp_path)
    ran = subprocess.run(
        [sys.executable, "-m", "nectar.cli", "api", "--port", "1"], env=env, capture_output=True, text=True, timeout=120
    )
    assert ran.returncode == 2 and "--initial-peers" in ran.stderr
    production = subprocess.run(
        [sys.executable, "-m", "nectar.cli", "api", "--initial-peers", "/ip4/127.0.0.1"],
        env={**env, "NECTAR_API_ENVIRONMENT": "production"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert production.returncode == 2 and "NECTAR_API_ADMIN_TOKEN" in production.stderr
