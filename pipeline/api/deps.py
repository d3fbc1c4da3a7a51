"""Shared pieces of the route modules: the service on the app, capped body reads, the
documented error responses."""

from __future__ import annotations

from typing import Any

from fastapi import Request

from pipeline.api.auth import ApiProblem
from pipeline.api.models import Problem
from pipeline.api.service import ApiService

PROBLEM_MEDIA_TYPE = "application/problem+json"


def _problem_doc(description: str) -> dict[str, Any]:
    return {"model": Problem, "description": description, "content": {PROBLEM_MEDIA_TYPE: {}}}


ERRORS: dict[int | str, dict[str, Any]] = {
    401: _problem_doc("no API key, or an unknown or revoked one"),
    403: _problem_doc("the key lacks the scope"),
    404: _problem_doc("not found (or not your tenant's)"),
    422: _problem_doc("the request is not valid"),
    429: _problem_doc("over the key's rate limit (see Retry-After)"),
}


def api_service(request: Request) -> ApiService:
    svc: ApiService = request.app.state.api_service
    return svc


def base_url(request: Request) -> str:
    return str(request.base_url)


async def read_capped(request: Request, max_bytes: int) -> bytes:
    """The request body, streamed; 413 as soon as it grows past `max_bytes`."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(max_bytes: int) -> ApiProblem:
    return ApiProblem(413, "Content Too Large", f"the request body is over the limit of {max_bytes} bytes")
