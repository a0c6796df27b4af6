"""The OpenAI test server plus the Files and Batches endpoints, with outcomes chosen by the test.

    with BatchServer(outcomes=["expire", "complete"]) as srv: ...   # srv.url, srv.creates

Each created batch takes the next entry of `outcomes` (then "complete"):
- complete: validating -> in_progress -> finalizing -> completed, every request answered;
- expire:   ... -> expired, the first `expire_fraction` of requests answered, the rest in the
            error file as batch_expired;
- fail:     validating -> failed (errors.data says why), no output;
- stall:    stays in_progress (until cancelled: cancelling -> cancelled, `expire_fraction` done).
A batch moves one step per GET /v1/batches/{id} (listing does not move it). Answers are made by
sending each request line to this server's own /v1/chat/completions, so they are exactly what an
online harvest would get (and `reject` turns a line into an error-file entry with its 400).
Counters (uploads, creates, cancels, downloads, batch_lines) let a test assert that a rerun
created nothing twice.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from tests.openai_server import OpenAIServer


@dataclass
class BatchServer(OpenAIServer):
    outcomes: list[str] = field(default_factory=list)
    expire_fraction: float = 0.5
    create_latency: float = 0.0  # seconds to sit on a create *after* making the batch

    def __post_init__(self) -> None:
        super().__post_init__()
        self.files: dict[str, dict[str, Any]] = {}
        self.contents: dict[str, bytes] = {}
        self.batches: dict[str, dict[str, Any]] = {}
        self.lines: dict[str, list[dict[str, Any]]] = {}  # batch id -> its request lines
        self.outcome: dict[str, str] = {}
        self.uploads = 0
        self.creates = 0
        self.cancels = 0
        self.downloads = 0
        self.batch_lines = 0  # request lines answered through batches
        self._n = 0

    def _id(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}{self._n:04d}"

    def _denied(self, request: web.Request) -> web.Response | None:
        if (
            self.api_key is not None
            and request.headers.get("Authorization") != f"Bearer {self.api_key}"
        ):
            return web.json_response(
                {"error": {"message": "Incorrect API key provided."}}, status=401
            )
        return None

    @staticmethod
    def _page(items: list[dict[str, Any]], request: web.Request) -> dict[str, Any]:
        """Newest first, `limit` and `after` as the OpenAI list endpoints take them."""
        items = sorted(items, key=lambda x: (x["created_at"], x["id"]), reverse=True)
        after = request.query.get("after")
        if after:
            ids = [x["id"] for x in items]
            items = items[ids.index(after) + 1 :] if after in ids else []
        limit = int(request.query.get("limit", "20"))
        page = items[:limit]
        return {"object": "list", "data": page, "has_more": len(items) > limit}

    # -- files ---------------------------------------------------------------------------------------

    async def upload_file(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        form = await request.post()
        upload = form.get("file")
        if not isinstance(upload, web.FileField) or form.get("purpose") != "batch":
            return web.json_response(
                {"error": {"message": "need file and purpose=batch"}}, status=400
            )
        data = upload.file.read()
        self.uploads += 1
        fid = self._id("file-")
        self.contents[fid] = data
        self.files[fid] = {
            "id": fid,
            "object": "file",
            "bytes": len(data),
            "created_at": int(time.time()),
            "filename": upload.filename,
            "purpose": "batch",
        }
        return web.json_response(self.files[fid])

    async def list_files(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        purpose = request.query.get("purpose")
        items = [f for f in self.files.values() if purpose is None or f["purpose"] == purpose]
        return web.json_response(self._page(items, request))

    async def file_content(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        fid = request.match_info["file_id"]
        if fid not in self.contents:
            return web.json_response(
                {"error": {"message": f"No such File object: {fid}"}}, status=404
            )
        self.downloads += 1
        return web.Response(body=self.contents[fid], content_type="application/octet-stream")

    # -- batches -------------------------------------------------------------------------------------

    async def create_batch(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        body = await request.json()
        fid = body.get("input_file_id")
        if fid not in self.contents:
            return web.json_response(
                {"error": {"message": f"invalid input_file_id {fid}"}}, status=400
            )
        lines = [json.loads(x) for x in self.contents[fid].decode().splitlines() if x.strip()]
        self.creates += 1
        bid = self._id("batch_")
        self.lines[bid] = lines
        self.outcome[bid] = self.outcomes.pop(0) if self.outcomes else "complete"
        self.batches[bid] = {
            "id": bid,
            "object": "batch",
            "endpoint": body.get("endpoint"),
            "input_file_id": fid,
            "completion_window": body.get("completion_window"),
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "errors": None,
            "created_at": int(time.time()),
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
            "metadata": body.get("metadata"),
        }
        if self.create_latency:  # made, but the client may give up before it hears so
            await asyncio.sleep(self.create_latency)
        return web.json_response(self.batches[bid])

    async def list_batches(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        return web.json_response(self._page(list(self.batches.values()), request))

    async def get_batch(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        bid = request.match_info["batch_id"]
        if bid not in self.batches:
            return web.json_response({"error": {"message": f"No such batch: {bid}"}}, status=404)
        await self._advance(bid)
        return web.json_response(self.batches[bid])

    async def cancel_batch(self, request: web.Request) -> web.Response:
        if (denied := self._denied(request)) is not None:
            return denied
        bid = request.match_info["batch_id"]
        b = self.batches.get(bid)
        if b is None:
            return web.json_response({"error": {"message": f"No such batch: {bid}"}}, status=404)
        self.cancels += 1
        if b["status"] in ("validating", "in_progress", "finalizing"):
            b["status"] = "cancelling"
        return web.json_response(b)

    async def _advance(self, bid: str) -> None:
        b = self.batches[bid]
        outcome = self.outcome[bid]
        lines = self.lines[bid]
        status = b["status"]
        if status == "validating":
            if outcome == "fail":
                b["status"] = "failed"
                b["errors"] = {
                    "object": "list",
                    "data": [
                        {
                            "code": "token_limit_exceeded",
                            "message": "Enqueued token limit reached.",
                            "line": None,
                        }
                    ],
                }
            else:
                b["status"] = "in_progress"
        elif status == "in_progress" and outcome != "stall":
            b["status"] = "finalizing"
        elif status == "finalizing":
            done = len(lines) if outcome == "complete" else int(len(lines) * self.expire_fraction)
            await self._finish(b, "completed" if outcome == "complete" else "expired", lines, done)
        elif status == "cancelling":
            await self._finish(b, "cancelled", lines, int(len(lines) * self.expire_fraction))

    async def _finish(
        self, b: dict[str, Any], status: str, lines: list[dict[str, Any]], done: int
    ) -> None:
        out: list[str] = []
        err: list[str] = []
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        async with aiohttp.ClientSession(headers=headers) as session:
            for line in lines[:done]:
                async with session.post(f"{self.url}/chat/completions", json=line["body"]) as r:
                    body = await r.json(content_type=None)
                    self.batch_lines += 1
                    result = {
                        "id": f"batch_req_{self._n}_{line['custom_id'][:8]}",
                        "custom_id": line["custom_id"],
                        "response": {
                            "status_code": r.status,
                            "request_id": f"req_{self.batch_lines}",
                            "body": body,
                        },
                        "error": None,
                    }
                    (out if r.status == 200 else err).append(json.dumps(result))
        if status == "expired":
            for line in lines[done:]:
                err.append(
                    json.dumps(
                        {
                            "id": f"batch_req_x_{line['custom_id'][:8]}",
                            "custom_id": line["custom_id"],
                            "response": None,
                            "error": {
                                "code": "batch_expired",
                                "message": "This request could not be executed before the completion window expired.",
                            },
                        }
                    )
                )
        for kind, rows in (("output", out), ("error", err)):
            if rows:
                fid = self._id("file-")
                self.contents[fid] = ("\n".join(rows) + "\n").encode()
                self.files[fid] = {
                    "id": fid,
                    "object": "file",
                    "bytes": len(self.contents[fid]),
                    "created_at": int(time.time()),
                    "filename": f"{b['id']}_{kind}.jsonl",
                    "purpose": "batch_output",
                }
                b[f"{kind}_file_id"] = fid
        b["status"] = status
        b["request_counts"] = {"total": len(lines), "completed": len(out), "failed": len(err)}

    def app(self) -> web.Application:
        app = super().app()
        app.router.add_post("/v1/files", self.upload_file)
        app.router.add_get("/v1/files", self.list_files)
        app.router.add_get("/v1/files/{file_id}/content", self.file_content)
        app.router.add_post("/v1/batches", self.create_batch)
        app.router.add_get("/v1/batches", self.list_batches)
        app.router.add_get("/v1/batches/{batch_id}", self.get_batch)
        app.router.add_post("/v1/batches/{batch_id}/cancel", self.cancel_batch)
        return app

    def __enter__(self) -> BatchServer:
        self.start()
        return self
