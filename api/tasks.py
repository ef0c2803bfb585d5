"""Celery tasks of the API (loaded by the worker only): ``nectar.api.fine_tune`` runs one prompt-tuning job.

The job row is the source of truth: the task claims it (queued -> running), reports progress into it and its events,
checks it for a cancellation after every step, and settles the job's credit hold at the end: the tokens the swarm
processed are charged on success or cancellation, nothing on failure.
"""

from __future__ import annotations

import io
import json
import logging
import time

from celery import current_app, shared_task

from nectar.api import crud
from nectar.api.core.config import Settings, get_settings
from nectar.api.models import JobStatus, utcnow
from nectar.api.training import PromptTuner, StepReport
from nectar.api.training_data import TrainingFileError, parse_jsonl, plan, tokenize
from nectar.api.worker import FINE_TUNE_TASK
from nectar.service.db import get_engine, session_scope

logger = logging.getLogger(__name__)

EVENT_EVERY_SECONDS = 1.0  # metric events at most this often (and always on the last step)


def _settings() -> Settings:
    """The Settings the worker was built with (``create_celery``: the command's flags and environment, read once),
    else this process's environment (a task run outside a worker)."""
    return current_app.conf.get("nectar_settings") or get_settings()


def _model_path(served_name: str) -> str:
    """The --models entry whose DHT name is ``served_name`` (the worker serves from the same settings as the API)."""
    from nectar.models import model_id_of

    settings = _settings()
    for entry in settings.models:
        try:
            if model_id_of(entry) == served_name:
                return entry
        except Exception:  # an entry that does not resolve here: keep looking
            continue
    raise TrainingFileError(
        f"this worker does not know the model {served_name!r}; start it with the API's "
        f"NECTAR_API_MODELS ({' '.join(settings.models)})"
    )


def _finish(
    engine,
    job_id: str,
    *,
    status: str,
    trained_tokens: int,
    charge: bool,
    message: str,
    level: str = "info",
    error: dict | None = None,
    tuned: dict | None = None,
) -> None:
    with session_scope(engine) as session:
        job = crud.get_job(session, job_id=job_id)
        if tuned is not None:
            crud.save_tuned_model(session, **tuned)
            job.fine_tuned_model = tuned["name"]
        if job.hold_id is not None:
            tokens = trained_tokens if charge else 0
            crud.settle_hold(
                session,
                hold_id=job.hold_id,
                cost=tokens * _settings().price_per_token,
                kind="fine_tune",
                model=job.model,
                prompt_tokens=tokens,
            )
        job.status, job.finished_at, job.trained_tokens = status, utcnow(), trained_tokens
        job.error = json.dumps(error) if error else None
        crud.add_job_event(session, job_id=job_id, level=level, message=message)


@shared_task(name=FINE_TUNE_TASK, acks_late=True)
def fine_tune(job_id: str) -> str:
    settings = _settings()
    engine = get_engine(settings.database_url)
    with session_scope(engine) as session:
        job = crud.claim_job(session, job_id=job_id)
        if job is None:
            logger.info(f"{job_id}: nothing to do (cancelled or finished before a worker took it)")
            return "skipped"
        restarted = job.step > 0
        job.step, job.trained_tokens, job.loss = 0, 0, None
        crud.add_job_event(
            session,
            job_id=job_id,
            message="Restarted after a worker was lost" if restarted else "Fine-tuning job started",
        )
        file = crud.get_file(session, account_id=job.account_id, file_id=job.training_file)
        content, model_name, account_id = file.content, job.model, job.account_id
        hyper, suffix = json.loads(job.hyperparameters), job.suffix
    model = scorer = None
    trained = 0
    try:
        from nectar.api.engine import make_scorer
        from nectar.client import ClientConfig, DistributedModelForCausalLM
        from nectar.models import load_tokenizer, resolve_model

        path = _model_path(model_name)
        tokenizer = load_tokenizer(resolve_model(path))
        model = DistributedModelForCausalLM.from_pretrained(
            path,
            initial_peers=settings.initial_peers,
            private_key=settings.gateway_key(),
            config=ClientConfig(  # with a ledger, the job countersigns the receipts it accepts and posts them
                step_timeout=settings.step_timeout,
                request_timeout=max(60.0, settings.step_timeout),
                ledger_url=settings.ledger_url,
            ),
            tuning_mode=hyper["tuning_mode"],
            pre_seq_len=hyper["pre_seq_len"],
            domain=settings.signing_domain(),
            scorer=(scorer := make_scorer(settings.ledger_url)),
        )
        eos = model.generation_config.eos_token_id
        eos = eos[0] if isinstance(eos, list) else eos
        max_length = int(getattr(model.config, "max_position_embeddings", 2048)) - hyper["pre_seq_len"]
        examples = tokenize(
            parse_jsonl(content, max_examples=settings.max_training_examples),
            tokenizer,
            eos_token_id=eos,
            max_length=max_length,
        )
        training = plan(
            examples,
            n_epochs=hyper["n_epochs"],
            batch_size=hyper["batch_size"],
            learning_rate_multiplier=hyper["learning_rate_multiplier"],
            pre_seq_len=hyper["pre_seq_len"],
            tuning_mode=hyper["tuning_mode"],
            max_steps=settings.fine_tune_max_steps,
        )
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
        tuner = PromptTuner(
            model,
            examples,
            training,
            pad_token_id=pad,
            seed=hyper["seed"],
            learning_rate=settings.fine_tune_learning_rate * hyper["learning_rate_multiplier"],
        )
        last_event = [0.0]

        def on_step(report: StepReport) -> bool:
            nonlocal trained
            trained = report.trained_tokens
            with session_scope(engine) as session:
                job = crud.get_job(session, job_id=job_id)
                job.step, job.trained_tokens, job.loss = report.step, report.trained_tokens, report.loss
                now = time.monotonic()
                if now - last_event[0] >= EVENT_EVERY_SECONDS or report.step == report.total_steps:
                    last_event[0] = now
                    crud.add_job_event(
                        session,
                        job_id=job_id,
                        message=f"Step {report.step}/{report.total_steps}: training loss={report.loss:.4f}",
                        data={
                            "step": report.step,
                            "total_steps": report.total_steps,
                            "epoch": report.epoch,
                            "train_loss": report.loss,
                            "trained_tokens": report.trained_tokens,
                        },
                    )
                return not job.cancel_requested

        result = tuner.run(on_step)
        if result.stopped:
            _finish(
                engine,
                job_id,
                status=JobStatus.CANCELLED,
                trained_tokens=result.trained_tokens,
                charge=True,
                message=f"Cancelled after {result.steps} steps ({result.trained_tokens} tokens charged)",
            )
            return JobStatus.CANCELLED
        buffer = io.BytesIO()
        model.save_prompts(buffer)
        name = f"ft:{model_name}:acct-{account_id}:{suffix + ':' if suffix else ''}{job_id.removeprefix('ftjob-')[:8]}"
        _finish(
            engine,
            job_id,
            status=JobStatus.SUCCEEDED,
            trained_tokens=result.trained_tokens,
            charge=True,
            message=f"The job has successfully completed; use model {name!r}",
            tuned={
                "name": name,
                "account_id": account_id,
                "job_id": job_id,
                "base_model": model_name,
                "tuning_mode": hyper["tuning_mode"],
                "pre_seq_len": hyper["pre_seq_len"],
                "prompts": buffer.getvalue(),
            },
        )
        logger.info(f"{job_id}: succeeded as {name} (loss {result.loss:.4f}, {result.trained_tokens} tokens)")
        return JobStatus.SUCCEEDED
    except Exception as e:
        logger.exception(f"{job_id} failed")
        code = "invalid_training_file" if isinstance(e, TrainingFileError) else "swarm_error"
        _finish(
            engine,
            job_id,
            status=JobStatus.FAILED,
            trained_tokens=trained,
            charge=False,
            level="error",
            message=f"Fine-tuning failed ({type(e).__name__}: {e}); the job was not charged",
            error={"code": code, "message": f"{type(e).__name__}: {e}", "param": None},
        )
        return JobStatus.FAILED
    finally:
        if model is not None:
            model.shutdown()
        if scorer is not None:
            scorer.close()
