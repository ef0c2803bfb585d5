"""``/v1/files``: upload, list, retrieve, download and delete fine-tuning files."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import Response

from nectar.api.deps import AuthDep, FilesServingDep
from nectar.api.protocol import FileDeleted, FileList, FileObject
from nectar.api.routes.responses import errors

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/v1", tags=["files"])


@router.post("/files", response_model=FileObject, summary="Upload a file", responses=errors(400, 401, 413, 422, 429))
async def upload_file(
    file: Annotated[UploadFile, File(description="The JSONL training file.")],
    purpose: Annotated[str, Form(description="``fine-tune``")],
    auth: AuthDep,
    serving: FilesServingDep,
) -> FileObject:
    """Upload a JSONL training file (multipart form: ``file``, ``purpose=fine-tune``); it is checked on upload."""
    content = await file.read(serving.settings.max_file_bytes + 1)
    return await serving.upload(auth, filename=file.filename or "upload.jsonl", purpose=purpose, content=content)


@router.get("/files", response_model=FileList, summary="List files", responses=errors(401, 429))
async def list_files(auth: AuthDep, serving: FilesServingDep, purpose: str | None = None) -> FileList:
    """The caller's files, newest first (optionally of one purpose)."""
    return await serving.list(auth, purpose)


@router.get("/files/{file_id}", response_model=FileObject, summary="Retrieve a file", responses=errors(401, 404, 429))
async def get_file(file_id: str, auth: AuthDep, serving: FilesServingDep) -> FileObject:
    """One file's metadata."""
    return await serving.get(auth, file_id)


@router.get(
    "/files/{file_id}/content",
    summary="Download a file",
    response_class=Response,
    responses={
        200: {"description": "The file's bytes.", "content": {"application/octet-stream": {}}},
        **errors(401, 404, 429),
    },
)
async def get_file_content(file_id: str, auth: AuthDep, serving: FilesServingDep) -> Response:
    """The file's bytes, as uploaded."""
    return Response(await serving.content(auth, file_id), media_type="application/octet-stream")


@router.delete(
    "/files/{file_id}", response_model=FileDeleted, summary="Delete a file", responses=errors(401, 404, 409, 429)
)
async def delete_file(file_id: str, auth: AuthDep, serving: FilesServingDep) -> FileDeleted:
    """Delete a file no fine-tuning job uses."""
    return await serving.delete(auth, file_id)
