"""Locust users that stream ``POST /v1/completions`` from an OpenAI-compatible server, as a library (no web UI).

Run by ``bench_api_load.py`` in a process of its own (locust's gevent patches the process it is imported in):

    python benchmarks/api/locust_openai.py --url URL --key KEY --model NAME --users 16 --work work.json --out out.json

``work.json`` holds each user's requests (prompt token ids); every user sends its requests one after the other
(a closed loop, no think time) and stops. Per request: time to first token, the time between tokens, and the
tokens the server's usage chunk counts. Locust's own statistics (requests, failures, response times) come along.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import gevent
from locust import HttpUser, constant, task
from locust.env import Environment
from locust.exception import StopUser

SAMPLES: list[dict] = []
ERRORS: list[str] = []


class CompletionUser(HttpUser):
    wait_time = constant(0)
    work: list[list[dict]] = []  # per user: request bodies
    key = ""
    _numbers = itertools.count()

    def on_start(self) -> None:
        self.index = next(CompletionUser._numbers)
        self.requests = list(CompletionUser.work[self.index % len(CompletionUser.work)])

    @task
    def complete(self) -> None:
        if not self.requests:
            raise StopUser()
        body = self.requests.pop(0)
        began = time.perf_counter()
        times, usage = [], None
        headers = {"Authorization": f"Bearer {CompletionUser.key}"}
        with self.client.post(
            "/v1/completions", json=body, headers=headers, stream=True, catch_response=True, name="completion"
        ) as response:
            if response.status_code != 200:
                ERRORS.append(f"{response.status_code}: {response.text[:300]}")
                response.failure(f"HTTP {response.status_code}")
                return
            for line in response.iter_lines():
                if not line.startswith(b"data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    times.append(time.perf_counter())
            response.success()
        if not times or usage is None:
            ERRORS.append("a stream ended without tokens or usage")
            return
        SAMPLES.append(
            {
                "user": self.index,
                "start": began,
                "first": times[0],
                "last": times[-1],
                "events": len(times),
                "tokens": usage["completion_tokens"],
            }
        )
        self.environment.events.request.fire(
            request_type="TTFT",
            name="first token",
            response_time=(times[0] - began) * 1000,
            response_length=0,
            exception=None,
            context={},
        )


def run(url: str, key: str, users: int, work: list[list[dict]], timeout: float) -> dict:
    CompletionUser.work, CompletionUser.key = work, key
    CompletionUser.host = url
    environment = Environment(user_classes=[CompletionUser], host=url)
    runner = environment.create_local_runner()
    began = time.perf_counter()
    runner.start(users, spawn_rate=max(1, users), wait=False)
    gevent.sleep(0.5)
    if runner.spawning_greenlet is not None:
        runner.spawning_greenlet.join()
    while runner.user_count > 0 and time.perf_counter() - began < timeout:
        gevent.sleep(0.1)
    timed_out = runner.user_count > 0
    runner.quit()
    total = environment.stats.total
    return {
        "samples": SAMPLES,
        "errors": ERRORS + (["timed out"] if timed_out else []),
        "locust": {
            "requests": total.num_requests,
            "failures": total.num_failures,
            "median_response_ms": total.median_response_time,
            "p95_response_ms": total.get_response_time_percentile(0.95),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--users", type=int, required=True)
    parser.add_argument("--work", required=True, help="JSON: a list per user of request bodies")
    parser.add_argument("--out", required=True)
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args()
    with open(args.work) as f:
        work = json.load(f)
    result = run(args.url, args.key, args.users, work, args.timeout)
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
