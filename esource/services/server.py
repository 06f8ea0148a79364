"""`esource serve`: HTTP intake + Kafka intake (when configured) + the outbox dispatcher, in one process.
Threads share one Container; uvicorn owns the main thread and stops on SIGINT/SIGTERM."""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from esource.bootstrap import Container, build
from esource.observability import configure_logging
from esource.runtime import settle_heap
from esource.settings import Settings, load_settings

log = logging.getLogger("esource.server")


@dataclass
class Background:
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    kafka: Any = None

    def shutdown(self, timeout: float = 10.0) -> None:
        self.stop.set()
        if self.kafka is not None:
            self.kafka.stop(timeout)
        for t in self.threads:
            t.join(timeout)


def start_background(container: Container, *, kafka: bool = True, poll_interval: float = 0.2) -> Background:
    """The dispatcher thread, and the Kafka consumer when kafka.bootstrap is set (in this process, or
    `kafka.workers` consumer processes: esource.services.kafka_workers)."""
    bg = Background()
    t = threading.Thread(target=container.dispatcher.run_forever, args=(bg.stop,),
                         kwargs={"poll_interval": poll_interval}, name="esource-dispatcher", daemon=True)
    t.start()
    bg.threads.append(t)
    if kafka and container.settings.kafka.bootstrap:
        if container.settings.kafka.workers > 1:
            from esource.services.kafka_workers import KafkaWorkerPool

            bg.kafka = KafkaWorkerPool(container, container.settings.kafka.workers)
        else:
            from esource.adapters.kafka import KafkaIntake

            bg.kafka = KafkaIntake(container, container.settings.kafka)
        container.extras["kafka"] = bg.kafka
        bg.kafka.start()
    return bg


def serve(config: Path | None, *, host: str | None = None, port: int | None = None,
          settings: Settings | None = None) -> None:
    settings = settings or load_settings(config)
    configure_logging(settings.log.level, json_logs=settings.log.json_logs)
    container = build(settings)
    settle_heap()
    bg = start_background(container)
    try:
        from esource.adapters.http import run_http

        run_http(container, host or settings.http.host, settings.http.port if port is None else port)
    finally:
        bg.shutdown()
        container.close()


def free_port(preferred: int = 0, host: str = "127.0.0.1") -> int:
    """`preferred` when it is free, else any free port."""
    for candidate in ([preferred] if preferred else []) + [0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, candidate))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free port")


class ThreadedServer:
    """uvicorn in a background thread (the demo and tests): start() waits until it accepts connections."""

    def __init__(self, app: Any, host: str, port: int, *, log_level: str = "warning",
                 graceful_shutdown_s: float | None = None) -> None:
        import uvicorn

        self.config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off",
                                     timeout_graceful_shutdown=graceful_shutdown_s)
        self.server = uvicorn.Server(self.config)
        self.thread = threading.Thread(target=self.server.run, name=f"uvicorn-{port}", daemon=True)

    def start(self, timeout: float = 10.0) -> None:
        import time

        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"HTTP server did not start on {self.config.host}:{self.config.port}")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    def __enter__(self) -> "ThreadedServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
