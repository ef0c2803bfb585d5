"""Fine-tuning jobs through the official `openai` client, run by a real `nectar api worker` (SQLite broker, and
Redis broker with PostgreSQL): upload checks, a job to completion whose tuned model answers, progress events,
cancellation mid-run, exact charges, 402 for a job the account cannot cover."""

from __future__ import annotations

import json
import time

import openai
import pytest

from tests.api.conftest import new_customer
from tests.api.utils import ApiWorker

pytestmark = pytest.mark.slow
PRICE = 10
TRAINING = [
    {"prompt": "Q: What is the capital of France?\nA:", "completion": " Paris"},
    {"prompt": "Q: Which city is the capital of France?\nA:", "completion": " Paris"},
    {"prompt": "Q: Name the French capital.\nA:", "completion": " Paris"},
    {"messages": [{"role": "user", "content": "France's capital city?"}, {"role": "assistant", "content": "Paris"}]},
]


def jsonl(rows) -> bytes:
    return "\n".join(json.dumps(r) for r in rows).encode()


@pytest.fixture(scope="module")
def worker(api, api_environment, tmp_path_factory):
    process = ApiWorker(env=api_environment, log_path=tmp_path_factory.mktemp("api-worker") / "worker.log")
    yield process
    process.stop()


def wait_job(client, job_id: str, statuses, timeout: float = 240, worker=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.5)
    tail = worker.log()[-3000:] if worker is not None else ""
    raise TimeoutError(f"{job_id} still {job.status} after {timeout}s\n{tail}")


def test_upload_checks_the_file(api, market):
    client = new_customer(api).openai(max_retries=0)
    with pytest.raises(openai.BadRequestError) as raised:
        client.files.create(file=("bad.jsonl", b'{"prompt": "no completion"}\n'), purpose="fine-tune")
    assert raised.value.body["param"] == "file" and "line 1" in raised.value.body["message"]
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("x.jsonl", jsonl(TRAINING)), purpose="assistants")
    uploaded = client.files.create(file=("train.jsonl", jsonl(TRAINING)), purpose="fine-tune")
    assert uploaded.bytes == len(jsonl(TRAINING)) and uploaded.filename == "train.jsonl"
    assert [f.id for f in client.files.list().data] == [uploaded.id]
    assert client.files.content(uploaded.id).read() == jsonl(TRAINING)


def test_job_runs_to_completion_and_the_tuned_model_answers(api, market, worker):
    customer = new_customer(api, credits="5")
    client = customer.openai()
    prompt = TRAINING[0]["prompt"]
    base = client.completions.create(model=market.model, prompt=prompt, max_tokens=3, temperature=0)
    assert not base.choices[0].text.startswith(" Paris")
    file = client.files.create(file=("train.jsonl", jsonl(TRAINING)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=market.model,
        training_file=file.id,
        suffix="paris",
        seed=1,
        hyperparameters={"n_epochs": 30, "batch_size": 4, "learning_rate_multiplier": 2, "tuning_mode": "deep_ptune"},
    )
    assert job.status == "queued" and job.total_steps == 30 and job.hyperparameters.tuning_mode == "deep_ptune"
    held = customer.account()["held_micro"]
    assert held > 0
    done = wait_job(client, job.id, ("succeeded", "failed", "cancelled"), worker=worker)
    assert done.status == "succeeded", (done.error, worker.log()[-3000:])
    assert done.fine_tuned_model.startswith(f"ft:{market.model}:acct-{customer.account_id}:paris:")
    assert done.trained_tokens > 0 and done.step == 30
    events = client.fine_tuning.jobs.list_events(job.id, limit=1000).data
    metrics = [e.data for e in events if e.type == "metrics"]
    assert metrics and metrics[0]["step"] == 30  # newest first
    assert metrics[0]["train_loss"] < metrics[-1]["train_loss"]
    assert any("successfully completed" in e.message for e in events)
    assert done.fine_tuned_model in [m.id for m in client.models.list().data]

    tuned = client.completions.create(model=done.fine_tuned_model, prompt=prompt, max_tokens=3, temperature=0)
    assert tuned.choices[0].text.startswith(" Paris"), tuned.choices[0].text
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=done.fine_tuned_model, prompt=prompt, max_tokens=3, temperature=0, stream=True
        )
    )
    assert streamed == tuned.choices[0].text
    question = [{"role": "user", "content": "France's capital city?"}]
    chat = client.chat.completions.create(model=done.fine_tuned_model, max_tokens=3, temperature=0, messages=question)
    base_chat = client.chat.completions.create(model=market.model, max_tokens=3, temperature=0, messages=question)
    assert chat.choices[0].message.content != base_chat.choices[0].message.content  # the soft prompt is in effect
    usage = {u["reference"]: u for u in customer.usage()}
    assert usage[job.id]["kind"] == "fine_tune" and usage[job.id]["cost_micro"] == done.trained_tokens * PRICE
    account = customer.account()
    assert account["held_micro"] == 0
    assert account["spent_micro"] == sum(u["cost_micro"] for u in usage.values())
    # the tuned model belongs to its account
    stranger = new_customer(api, credits="1").openai(max_retries=0)
    with pytest.raises(openai.NotFoundError):
        stranger.completions.create(model=done.fine_tuned_model, prompt=prompt, max_tokens=2)


def test_cancel_a_running_job_charges_the_steps_done(api, market, worker):
    customer = new_customer(api, credits="50")
    client = customer.openai()
    file = client.files.create(file=("train.jsonl", jsonl(TRAINING)), purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        model=market.model, training_file=file.id, hyperparameters={"n_epochs": 500, "batch_size": 1}
    )
    hold = customer.account()["held_micro"]

    def progressed():
        current = client.fine_tuning.jobs.retrieve(job.id)
        return current if current.status == "running" and current.step >= 3 else None

    deadline = time.time() + 180
    while not progressed():
        assert time.time() < deadline, worker.log()[-3000:]
        time.sleep(0.3)
    client.fine_tuning.jobs.cancel(job.id)
    done = wait_job(client, job.id, ("cancelled", "failed", "succeeded"), worker=worker)
    assert done.status == "cancelled" and 3 <= done.step < 2000
    assert done.fine_tuned_model is None
    charged = {u["reference"]: u["cost_micro"] for u in customer.usage()}[job.id]
    assert charged == done.trained_tokens * PRICE and 0 < charged < hold
    account = customer.account()
    assert (account["held_micro"], account["balance_micro"]) == (0, 50 * 10**6 - charged)
    assert any("Cancelled after" in e.message for e in client.fine_tuning.jobs.list_events(job.id).data)
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(job.id)


def test_a_job_the_account_cannot_cover_gets_402(api, market):
    customer = new_customer(api, credits="0.001")
    client = customer.openai(max_retries=0)
    file = client.files.create(file=("train.jsonl", jsonl(TRAINING)), purpose="fine-tune")
    with pytest.raises(openai.APIStatusError) as raised:
        client.fine_tuning.jobs.create(model=market.model, training_file=file.id, hyperparameters={"n_epochs": 50})
    assert raised.value.status_code == 402
    assert client.fine_tuning.jobs.list().data == []
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.create(model="not-served", training_file=file.id)
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.create(model=market.model, training_file="file-missing")
