"""`/metrics`, `/healthz` and `/readyz` on an HTTP app's own port (the review app, the API)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from pipeline.metrics import Readiness, render_metrics


def add_probe_routes(app: FastAPI, readiness: Readiness | None) -> None:
    """`readiness` None: ready while serving."""

    @app.get("/metrics", include_in_schema=False)
    def metrics_route(request: Request) -> Response:
        body, content_type = render_metrics(request.headers.get("accept"))
        return Response(body, media_type=content_type)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> Response:
        return Response("ok\n", media_type="text/plain")

    @app.get("/readyz", include_in_schema=False)
    def readyz() -> Response:
        doc = readiness.report() if readiness is not None else {"ready": True, "checks": {}}
        return JSONResponse(doc, status_code=200 if doc["ready"] else 503)
