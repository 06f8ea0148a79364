"""Metrics (Prometheus) and structured JSON logs without patient data.

One `Metrics` object per process, on its own registry (so tests and several apps in one process do
not collide). Log records carry only technical context: channel, intake key, study, SubjectKey,
counts, reasons — never FHIR content, names or hospital identifiers.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

# keys a log call may attach with `extra=`; anything else is dropped (no accidental patient data)
_LOG_FIELDS = ("channel", "intake_key", "study", "subject_key", "count", "reason", "kind", "topic", "partition",
               "offset", "outbox_id", "sequence", "status", "attempt", "duration_ms", "connector", "url")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.messages = Counter("esource_messages_consumed_total", "Input messages received, by channel and outcome",
                                ["channel", "outcome"], registry=r)
        self.resources = Counter("esource_fhir_resources_total", "FHIR resources received, by channel",
                                 ["channel"], registry=r)
        self.items_mapped = Counter("esource_items_mapped_total", "ItemData put in the outbox, by study and "
                                    "transaction type", ["study", "transaction_type"], registry=r)
        self.discrepancies = Counter("esource_discrepancies_total", "New discrepancies, by study and kind",
                                     ["study", "kind"], registry=r)
        self.dead_letters = Counter("esource_dead_letters_total", "Inputs that could not be processed, by channel",
                                    ["channel"], registry=r)
        self.dropped_not_enrolled = Counter("esource_resources_not_enrolled_total",
                                            "Resources about patients who are not enrolled (dropped after matching)",
                                            registry=r)
        self.outbox_depth = Gauge("esource_outbox_depth", "Outbox transactions not yet delivered", ["status"],
                                  registry=r)
        self.delivery_latency = Histogram("esource_delivery_latency_seconds",
                                          "From outbox commit to EDC acknowledgement", ["connector"], registry=r,
                                          buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
        self.deliveries = Counter("esource_deliveries_total", "Delivery attempts, by connector and outcome",
                                  ["connector", "outcome"], registry=r)
        self.consumer_lag = Gauge("esource_kafka_consumer_lag", "Messages behind the partition's high watermark",
                                  ["topic", "partition"], registry=r)
        self.circuit_open = Gauge("esource_edc_circuit_open", "1 while the EDC endpoint's circuit breaker is open",
                                  ["connector"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key in _LOG_FIELDS:
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info and record.exc_info[0] is not None:
            out["error"] = f"{record.exc_info[0].__name__}: {record.exc_info[1]}"
        return json.dumps(out, ensure_ascii=False, default=str)


def configure_logging(level: str = "INFO", *, json_logs: bool = True) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_logs else logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("esource")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
