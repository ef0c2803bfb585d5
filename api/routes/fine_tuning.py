"""``/v1/fine_tuning/jobs``: prompt-tuning jobs run by ``nectar api worker``."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Query

from nectar.api.deps import AuthDep, FineTuningServingDep
from nectar.api.protocol import FineTuningJob, FineTuningJobCreate, FineTuningJobEventList, FineTuningJobList
from nectar.api.routes.responses import errors

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/fine_tuning", tags=["fine-tuning"])


@router.post(
    "/jobs",
    response_model=FineTuningJob,
    summary="Create a fine-tuning job",
    responses=errors(400, 401, 402, 404, 422, 429, 503),
)
async def create_job(body: FineTuningJobCreate, auth: AuthDep, serving: FineTuningServingDep) -> FineTuningJob:
    """Prompt-tune a swarm model on an uploaded file. The worst-case cost (every step at the longest example) is held
    now; the tokens the swarm processes are charged when the job ends (nothing if it fails)."""
    return await serving.create_job(body, auth)


@router.get("/jobs", response_model=FineTuningJobList, summary="List fine-tuning jobs", responses=errors(401, 429))
async def list_jobs(
    auth: AuthDep, serving: FineTuningServingDep, after: str | None = None, limit: int = Query(default=20, ge=1, le=100)
) -> FineTuningJobList:
    """The caller's jobs, newest first; page with ``after`` (a job id)."""
    return await serving.list_jobs(auth, after=after, limit=limit)


@router.get(
    "/jobs/{fine_tuning_job_id}",
    response_model=FineTuningJob,
    summary="Retrieve a fine-tuning job",
    responses=errors(401, 404, 429),
)
async def get_job(fine_tuning_job_id: str, auth: AuthDep, serving: FineTuningServingDep) -> FineTuningJob:
    """Status and progress (step, total_steps, loss, trained_tokens)."""
    return await serving.get_job(auth, fine_tuning_job_id)


@router.post(
    "/jobs/{fine_tuning_job_id}/cancel",
    response_model=FineTuningJob,
    summary="Cancel a fine-tuning job",
    responses=errors(400, 401, 404, 429),
)
async def cancel_job(fine_tuning_job_id: str, auth: AuthDep, serving: FineTuningServingDep) -> FineTuningJob:
    """A queued job is cancelled at once (not charged); a running one stops after its current step and is charged
    for the steps done."""
    return await serving.cancel_job(auth, fine_tuning_job_id)


@router.get(
    "/jobs/{fine_tuning_job_id}/events",
    response_model=FineTuningJobEventList,
    summary="List fine-tuning events",
    responses=errors(400, 401, 404, 429),
)
async def list_events(
    fine_tuning_job_id: str,
    auth: AuthDep,
    serving: FineTuningServingDep,
    after: str | None = None,
    limit: int = Query(default=20, ge=1, le=1000),
) -> FineTuningJobEventList:
    """Status messages and per-step metrics, newest first; page with ``after`` (an event id)."""
    return await serving.list_events(auth, fine_tuning_job_id, after=after, limit=limit)
