"""The baseline of ``bench inbound``: a webhook endpoint in the same framework (FastAPI on
uvicorn) that only verifies the Stripe signature and answers 200 — no storage, no
deduplication. ``python -m bench.bare_receiver --port N`` (secret: BENCH_WEBHOOK_SECRET)."""

from __future__ import annotations

import argparse
import os

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from integrations.signatures import SignatureError, verify_stripe

SECRET = os.environ.get("BENCH_WEBHOOK_SECRET", "")
app = FastAPI()


@app.get("/health/live")
def live():
    return {"status": "ok"}


@app.post("/webhooks/{provider}")
async def receive(provider: str, request: Request):
    body = await request.body()
    try:
        verify_stripe(body, request.headers.get("stripe-signature"), [SECRET])
    except SignatureError as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)
    return {"received": True}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    uvicorn.run(app, host="127.0.0.1", port=p.parse_args().port, log_config=None,
                access_log=False, server_header=False)
