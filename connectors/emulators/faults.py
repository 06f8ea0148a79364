"""Fault injection shared by the EDC emulators (sandbox, Rave, REDCap, OpenClinica): the plan of the
next failures to answer, and dropping a connection without a response."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import threading
from collections import Counter
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.requests import Request
from starlette.responses import Response


class FaultRequestBase(BaseModel):
    """What every emulator's `POST /_faults` takes; each emulator narrows `mode`/`modes` to its own
    fault modes and adds its own keys (the status of a rejection, a target ...)."""

    model_config = ConfigDict(extra="forbid")

    mode: str | None = None
    modes: list[str] | None = None
    count: int | None = Field(1, ge=0)  # None: until cleared
    rate: float = Field(1.0, ge=0.0, le=1.0)
    seed: int | None = None
    retry_after: float = Field(1.0, ge=0.0)  # 429, 503
    delay: float = Field(30.0, ge=0.0, le=3600.0)  # timeout, slow
    after_commit: bool | float = False  # or a probability
    message: str | None = None  # reject

    @model_validator(mode="after")
    def _one_mode(self) -> "FaultRequestBase":
        if not self.mode and not self.modes:
            raise ValueError("give mode or modes")
        return self


@dataclasses.dataclass(slots=True)
class Fault:
    mode: str
    after_commit: bool
    plan: Any  # the emulator's fault request model


class FaultPlan:
    """One active fault request (a pydantic model with mode/modes, count, rate, seed, after_commit and
    optionally scope); thread-safe. `take(kind)` answers the fault for one request, if any."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.request: Any = None
        self.remaining: int | None = 0
        self.rng = random.Random()
        self.injected: Counter[str] = Counter()

    def set(self, req: Any) -> None:
        with self._lock:
            self.request, self.remaining, self.rng = req, req.count, random.Random(req.seed)

    def clear(self) -> None:
        with self._lock:
            self.request, self.remaining = None, 0

    def take(self, kind: str | None = None, *, commit_kind: str | None = None) -> Fault | None:
        """`kind` is matched against the request's `scope` (when it has one); with `commit_kind`, only
        requests of that kind can fail after committing."""
        with self._lock:
            req = self.request
            if req is None or self.remaining == 0:
                return None
            scope = getattr(req, "scope", "any")
            if kind is not None and scope != "any" and scope != kind:
                return None
            if req.rate < 1.0 and self.rng.random() >= req.rate:
                return None
            if self.remaining is not None:
                self.remaining -= 1
            mode = self.rng.choice(req.modes) if req.modes else req.mode
            ac = req.after_commit
            after = ac if isinstance(ac, bool) else self.rng.random() < float(ac)
            after = after and (commit_kind is None or kind == commit_kind)
            self.injected[f"{mode}{'+after_commit' if after else ''}"] += 1
            return Fault(str(mode), after, req)

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {"active": self.request.model_dump() if self.request and self.remaining != 0 else None,
                    "remaining": self.remaining, "injected": dict(self.injected)}


async def drop_connection(request: Request, who: str) -> Response:
    """Close the client's connection without any answer. Under uvicorn the transport is reachable
    through the server's `receive` callable; elsewhere (TestClient) a ConnectionResetError is raised."""
    cycle = getattr(request.receive, "__self__", None)
    transport = getattr(cycle, "transport", None)
    if transport is not None and hasattr(transport, "abort"):
        transport.abort()
        for _ in range(50):  # let the server notice, so it does not try to answer on a dead socket
            if getattr(cycle, "disconnected", True):
                break
            await asyncio.sleep(0)
        return Response(status_code=500)  # never sent: the connection is gone
    raise ConnectionResetError(f"{who}: connection dropped (injected fault)")
