"""The API fuzzed from its own OpenAPI schema (schemathesis as a library, issue 24): every operation of a running
`nectar api` (SQLite, and PostgreSQL + Redis) gets valid and invalid requests built from the schema; no answer may
be a 5xx or break the schema it documents.

Kept to CI's budget: ``NECTAR_FUZZ_EXAMPLES`` examples per operation and mode (default 15, about 20 s a backend on
2 cores; 100 ran clean in under 2 minutes a backend), no shrinking, and generations capped at 2 new tokens (the
fuzzer picks ``max_tokens``, the test lowers it), so no request runs long.
"""

from __future__ import annotations

import os
from collections import Counter

import httpx
import pytest

from tests.api.conftest import ADMIN
from tests.api.utils import market_api_env

pytestmark = pytest.mark.slow

EXAMPLES = int(os.environ.get("NECTAR_FUZZ_EXAMPLES", "15"))
GENERATION = {"/v1/completions", "/v1/chat/completions"}
OPERATOR = ("/v1/admin/", "/v1/nodes/", "/v1/market/stats")


@pytest.fixture(scope="module")
def api_environment(market, backend) -> dict:
    return market_api_env(
        market,
        backend,
        rate_limit_per_minute=1_000_000,  # the fuzzer's pace is not what is tested here
        auth_failures_per_minute=1_000_000,
    )


def _bounded(case, model: str) -> None:
    """A generation the fuzzer built, made short: our model, at most 2 new tokens, no stream of unknown length."""
    if case.path not in GENERATION or not isinstance(case.body, dict):
        return
    case.body["model"] = model
    for name in ("max_tokens", "max_completion_tokens"):
        if name in case.body:
            value = case.body[name]
            case.body[name] = min(value, 2) if isinstance(value, int) and not isinstance(value, bool) else value
    if case.path == "/v1/chat/completions" and "max_tokens" not in case.body:  # else the gateway's default
        case.body.setdefault("max_completion_tokens", 2)


def test_no_operation_answers_5xx_or_breaks_its_schema(api, market):
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis.checks import not_a_server_error, response_schema_conformance

    def fresh_user() -> dict:
        """A funded account of its own per operation: the fuzzer may revoke its key (DELETE /v1/account/keys/1)."""
        with httpx.Client(base_url=api.url, timeout=60) as h:
            created = h.post("/v1/accounts", json={"name": "fuzz"}).json()
            account = created["account"]["id"].removeprefix("acct-")
            granted = h.post(f"/v1/admin/accounts/{account}/credit", json={"credits": "100"}, headers=ADMIN)
            assert granted.status_code == 200, granted.text
        return {"Authorization": f"Bearer {created['api_key']}"}

    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json")
    failures: list[str] = []
    calls = 0
    answered: Counter[tuple[str, int]] = Counter()  # (operation, status): what the fuzzer reached
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 30

    def fuzz(operation, mode, headers) -> None:
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            database=None,
            derandomize=True,  # the same cases each run: a failure reproduces
            phases=[Phase.explicit, Phase.generate],  # no shrinking: CI time
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case):
            nonlocal calls
            _bounded(case, market.model)
            calls += 1
            response = case.call(headers=headers, timeout=120)
            answered[(f"{operation.method.upper()} {operation.path}", response.status_code)] += 1
            try:
                case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])
            except Exception as e:  # collected: one report of every operation that fails
                body = case.body if not isinstance(case.body, bytes | str) else case.body[:200]
                failures.append(
                    f"{operation.method.upper()} {operation.path} [{mode.value}] -> {response.status_code}: "
                    f"{str(e)[:400]} | path={case.path_parameters} query={case.query} body={str(body)[:300]}"
                )

        try:
            run()
        except Unsatisfiable:  # no invalid request exists (an operation without parameters): nothing to send
            assert mode == GenerationMode.NEGATIVE, f"{operation.method} {operation.path}: no valid request"

    # valid generations, streamed and not, checked against their documented answers (the fuzzer's own cases are
    # mostly refused: a random body rarely names a served model with a prompt that fits)
    headers = fresh_user()
    for operation in operations:
        if operation.path in GENERATION and operation.method.upper() == "POST":
            text = (
                {"prompt": "Hello"}
                if operation.path == "/v1/completions"
                else {"messages": [{"role": "user", "content": "Hi"}]}
            )
            for stream in (False, True):
                body = {"model": market.model, "max_tokens": 2, "stream": stream, "n": 2, **text}
                case = operation.Case(body=body, media_type="application/json")
                response = case.call(headers=headers, timeout=120)
                assert response.status_code == 200, response.text
                case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])

    for operation in operations:
        headers = ADMIN if operation.path.startswith(OPERATOR) else fresh_user()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            fuzz(operation, mode, headers)
    assert calls >= len(operations) * EXAMPLES // 2  # most operations got their examples
    assert failures == [], "\n".join(failures[:30])
    succeeded = {name for (name, status), _ in answered.items() if 200 <= status < 300}
    print(
        f"fuzz: {calls} calls, {len(succeeded)} of {len(operations)} operations answered 2xx: "
        f"{sorted(answered.items())}"
    )
    # the fuzzer got past authentication and validation: many operations succeeded at least once
    assert len(succeeded) >= len(operations) // 3, answered
