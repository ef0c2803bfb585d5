"""``OpenAIServingFineTuning`` and ``OpenAIServingFiles``: uploads, and prompt-tuning jobs run by the Celery worker.

A job is validated here (file format, lengths, step budget), its worst-case cost is held (402 if the account cannot
cover it), and the task is enqueued by name; the worker (``nectar api worker``) does the training.
"""

from __future__ import annotations

import json
import logging
import math
import secrets

import anyio

from nectar.api import crud
from nectar.api.errors import ApiError, bad_request, not_found, unavailable
from nectar.api.models import FineTuningEvent, FineTuningJob, JobStatus
from nectar.api.protocol import (
    FileDeleted,
    FileList,
    FileObject,
    FineTuningError,
    FineTuningJobCreate,
    FineTuningJobEvent,
    FineTuningJobEventList,
    FineTuningJobHyperparameters,
    FineTuningJobList,
    Hyperparameters,
)
from nectar.api.protocol import (
    FineTuningJob as JobOut,
)
from nectar.api.serving.base import Auth, OpenAIServing, ServingContext
from nectar.api.training_data import TrainingFileError, parse_jsonl, plan, tokenize
from nectar.api.worker import FINE_TUNE_TASK, producer_app
from nectar.service.db import session_scope

logger = logging.getLogger(__name__)

AUTO_EPOCHS, AUTO_BATCH = 3, 4
FILE_PURPOSES = ("fine-tune",)


def _ts(value) -> int | None:
    return None if value is None else int(value.timestamp())


class OpenAIServingFiles(OpenAIServing):
    """``/v1/files``: small JSONL training files, kept in the database."""

    def _public(self, row) -> FileObject:
        return FileObject(
            id=row.id, bytes=row.size, created_at=_ts(row.created_at), filename=row.filename, purpose=row.purpose
        )

    def _tx(self, work):
        def run():
            with session_scope(self.context.db) as session:
                return work(session)

        return anyio.to_thread.run_sync(run)

    async def upload(self, auth: Auth, *, filename: str, purpose: str, content: bytes) -> FileObject:
        if purpose not in FILE_PURPOSES:
            raise bad_request(f"purpose must be one of {FILE_PURPOSES}, got {purpose!r}", param="purpose")
        if len(content) > self.settings.max_file_bytes:
            raise ApiError(
                413,
                f"the file has {len(content)} bytes; at most {self.settings.max_file_bytes} are accepted",
                param="file",
                code="file_too_large",
            )
        try:
            parse_jsonl(content, max_examples=self.settings.max_training_examples)
        except TrainingFileError as e:
            raise bad_request(f"Invalid fine-tuning file: {e}", param="file", code="invalid_file") from None
        row = await self._tx(
            lambda s: crud.create_file(
                s,
                account_id=auth.account_id,
                filename=filename[:255].replace("\x00", ""),
                purpose=purpose,
                content=content,
            )
        )
        return self._public(row)

    async def list(self, auth: Auth, purpose: str | None) -> FileList:
        rows = await self._tx(lambda s: crud.list_files(s, account_id=auth.account_id, purpose=purpose))
        return FileList(data=[self._public(r) for r in rows])

    async def get(self, auth: Auth, file_id: str) -> FileObject:
        row = await self._tx(lambda s: crud.get_file(s, account_id=auth.account_id, file_id=file_id))
        if row is None:
            raise not_found(f"No file {file_id!r} (GET /v1/files lists yours)", param="file_id")
        return self._public(row)

    async def content(self, auth: Auth, file_id: str) -> bytes:
        row = await self._tx(lambda s: crud.get_file(s, account_id=auth.account_id, file_id=file_id))
        if row is None:
            raise not_found(f"No file {file_id!r} (GET /v1/files lists yours)", param="file_id")
        return row.content

    async def delete(self, auth: Auth, file_id: str) -> FileDeleted:
        def work(session):
            try:
                return crud.delete_file(session, account_id=auth.account_id, file_id=file_id)
            except ValueError as e:
                raise ApiError(409, str(e), param="file_id", code="file_in_use") from None

        if not await self._tx(work):
            raise not_found(f"No file {file_id!r}", param="file_id")
        return FileDeleted(id=file_id, deleted=True)


class OpenAIServingFineTuning(OpenAIServing):
    """``/v1/fine_tuning/jobs``: create, list, get, cancel, events."""

    def __init__(self, context: ServingContext):
        super().__init__(context)
        self._celery = None

    def _tx(self, work):
        def run():
            with session_scope(self.context.db) as session:
                return work(session)

        return anyio.to_thread.run_sync(run)

    def job_public(self, job: FineTuningJob) -> JobOut:
        hyper = json.loads(job.hyperparameters)
        resolved = FineTuningJobHyperparameters(**{k: hyper[k] for k in FineTuningJobHyperparameters.model_fields})
        error = FineTuningError(**json.loads(job.error)) if job.error else None
        return JobOut(
            id=job.id,
            created_at=_ts(job.created_at),
            finished_at=_ts(job.finished_at),
            model=job.model,
            fine_tuned_model=job.fine_tuned_model,
            organization_id=f"acct-{job.account_id}",
            status=job.status,
            hyperparameters=resolved,
            training_file=job.training_file,
            trained_tokens=job.trained_tokens,
            error=error,
            seed=hyper["seed"],
            step=job.step,
            total_steps=job.total_steps,
            loss=job.loss,
        )

    async def create_job(self, body: FineTuningJobCreate, auth: Auth) -> JobOut:
        if body.validation_file:
            raise bad_request("validation files are not supported", param="validation_file")
        base = self.swarm.get(body.model)
        if base is None:
            raise not_found(
                f"{body.model!r} is not a swarm model of this gateway; fine-tune one of: "
                f"{', '.join(self.swarm.models)}",
                param="model",
                code="model_not_found",
            )
        hp = body.hyperparameters or Hyperparameters()
        auto = lambda value, default: default if value == "auto" else value  # noqa: E731
        n_epochs, batch_size = int(auto(hp.n_epochs, AUTO_EPOCHS)), int(auto(hp.batch_size, AUTO_BATCH))
        lr_mult = float(auto(hp.learning_rate_multiplier, 1.0))
        pre_seq_len = int(auto(hp.pre_seq_len, self.settings.fine_tune_pre_seq_len))
        for name, value, low in (
            ("n_epochs", n_epochs, 1),
            ("batch_size", batch_size, 1),
            ("pre_seq_len", pre_seq_len, 1),
        ):
            if value < low:
                raise bad_request(f"hyperparameters.{name} must be >= {low}", param=f"hyperparameters.{name}")
        if not 0 < lr_mult <= 100 or not math.isfinite(lr_mult):
            raise bad_request(
                "hyperparameters.learning_rate_multiplier must be in (0, 100]",
                param="hyperparameters.learning_rate_multiplier",
            )
        file = await self._tx(lambda s: crud.get_file(s, account_id=auth.account_id, file_id=body.training_file))
        if file is None:
            raise not_found(
                f"No file {body.training_file!r} of yours; upload it with POST /v1/files (purpose=fine-tune)",
                param="training_file",
            )
        if file.purpose != "fine-tune":
            raise bad_request(f"{file.id} has purpose {file.purpose!r}, not 'fine-tune'", param="training_file")
        try:
            examples = tokenize(
                parse_jsonl(file.content, max_examples=self.settings.max_training_examples),
                base.tokenizer,
                eos_token_id=base.eos_token_ids[0] if base.eos_token_ids else None,
                max_length=base.max_model_len - pre_seq_len,
            )
            training = plan(
                examples,
                n_epochs=n_epochs,
                batch_size=batch_size,
                learning_rate_multiplier=lr_mult,
                pre_seq_len=pre_seq_len,
                tuning_mode=hp.tuning_mode,
                max_steps=self.settings.fine_tune_max_steps,
            )
        except TrainingFileError as e:
            raise bad_request(f"Invalid training file: {e}", param="training_file", code="invalid_file") from None
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        hyper = {**training.to_json(), "seed": seed}
        job_id = crud.new_job_id()
        hold_id = await self.billing.reserve(
            account_id=auth.account_id,
            tokens=training.max_tokens,
            reference=job_id,
            what=f"this job ({training.total_steps} steps)",
        )

        def work(session):
            job = crud.create_job(
                session,
                job_id=job_id,
                account_id=auth.account_id,
                model=body.model,
                training_file=file.id,
                hyperparameters=hyper,
                suffix=body.suffix,
                total_steps=training.total_steps,
                hold_id=hold_id,
            )
            crud.add_job_event(
                session,
                job_id=job_id,
                message=f"Job created: {len(examples)} examples, {training.total_steps} steps; waiting for a worker",
            )
            return job

        job = await self._tx(work)
        try:
            await anyio.to_thread.run_sync(self._enqueue, job_id)
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"
            logger.warning(f"Could not enqueue {job_id}: {reason}")

            def fail(session):
                crud.cancel_queued_job(session, job_id=job_id)
                failed = crud.get_job(session, job_id=job_id)
                failed.status = JobStatus.FAILED
                failed.error = json.dumps({"code": "broker_unavailable", "message": reason, "param": None})
                crud.settle_hold(session, hold_id=hold_id, cost=0, kind="fine_tune", model=body.model)

            await self._tx(fail)
            raise unavailable(
                f"Could not queue the job: the task broker does not answer ({reason}). Nothing was "
                f"charged; retry when `nectar api worker` and its broker are up.",
                code="broker_unavailable",
            ) from None
        logger.info(f"Queued {job_id}: {body.model}, {training.total_steps} steps, account acct-{auth.account_id}")
        return self.job_public(job)

    def _enqueue(self, job_id: str) -> None:
        if self._celery is None:
            self._celery = producer_app(self.settings)
        self._celery.send_task(FINE_TUNE_TASK, args=[job_id])

    async def _job(self, auth: Auth, job_id: str) -> FineTuningJob:
        job = await self._tx(lambda s: crud.get_job(s, job_id=job_id, account_id=auth.account_id))
        if job is None:
            raise not_found(f"No fine-tuning job {job_id!r} of yours", param="fine_tuning_job_id")
        return job

    async def get_job(self, auth: Auth, job_id: str) -> JobOut:
        return self.job_public(await self._job(auth, job_id))

    async def list_jobs(self, auth: Auth, *, after: str | None, limit: int) -> FineTuningJobList:
        rows = await self._tx(lambda s: crud.list_jobs(s, account_id=auth.account_id, after=after, limit=limit + 1))
        return FineTuningJobList(data=[self.job_public(j) for j in rows[:limit]], has_more=len(rows) > limit)

    async def cancel_job(self, auth: Auth, job_id: str) -> JobOut:
        await self._job(auth, job_id)

        def work(session):
            job = crud.get_job(session, job_id=job_id)
            if job.status in JobStatus.FINAL:
                raise bad_request(f"{job_id} is already {job.status}", param="fine_tuning_job_id", code="job_finished")
            if crud.cancel_queued_job(session, job_id=job_id):
                if job.hold_id is not None:
                    crud.settle_hold(session, hold_id=job.hold_id, cost=0, kind="fine_tune", model=job.model)
                crud.add_job_event(session, job_id=job_id, message="Cancelled before it started (not charged)")
            else:
                job.cancel_requested = True
                crud.add_job_event(
                    session, job_id=job_id, message="Cancellation requested; the worker stops after the current step"
                )
            session.flush()
            session.refresh(job)
            return job

        return self.job_public(await self._tx(work))

    async def list_events(self, auth: Auth, job_id: str, *, after: str | None, limit: int) -> FineTuningJobEventList:
        await self._job(auth, job_id)
        after_id = None
        if after:
            try:
                after_id = int(after.removeprefix("ftevent-"))
                if not 0 <= after_id < 2**63:  # a 64-bit column
                    raise ValueError(after)
            except ValueError:
                raise bad_request(f"after must be an event id (ftevent-<n>), got {after!r}", param="after") from None
        rows = await self._tx(lambda s: crud.list_job_events(s, job_id=job_id, after=after_id, limit=limit + 1))

        def public(e: FineTuningEvent) -> FineTuningJobEvent:
            data = json.loads(e.data) if e.data else None
            return FineTuningJobEvent(
                id=f"ftevent-{e.id}",
                created_at=_ts(e.created_at),
                level=e.level,
                message=e.message,
                data=data,
                type="metrics" if data else "message",
            )

        return FineTuningJobEventList(data=[public(e) for e in rows[:limit]], has_more=len(rows) > limit)
