"""The service as bootstrap wires it applies the review-before-send policy: a data manager switches a
form to `adjudicate`, the next message's values for it wait in the queue, accepting one sends it."""

from __future__ import annotations

from pathlib import Path

from esource.bootstrap import build, load_enrollments
from esource.connectors.odm_file import OdmFileConnector
from esource.domain.model import DiscrepancyKind
from esource.reconciliation.actions import Reconciliation
from esource.reconciliation.model import DiscrepancyFilter
from esource.services.ingest import Envelope
from esource.services.demo import builtin_config_dir
from esource.settings import load_settings


def test_adjudicated_form_holds_values_until_a_data_manager_accepts(store_url: str, tmp_path: Path):
    settings = load_settings(mode="demo", database_url=store_url)
    container = build(settings, connectors={"CV01": OdmFileConnector(tmp_path / "odm")})
    try:
        load_enrollments(container, builtin_config_dir() / "demo_enrollment.yaml")
        rec = Reconciliation.from_container(container)
        rec.set_review_policy("CV01", {"F.VS": "adjudicate"}, actor="user:dm1", reason="site 001 start-up")
        bundle = next((builtin_config_dir() / "demo_data").glob("Arla_Lang_*.json")).read_bytes()
        (result,) = container.ingest.ingest_batch([(bundle, Envelope("file", "arla", "arla.json"))])
        assert result.accepted
        with container.store.uow(read_only=True) as uow:
            rows = uow.outbox_entries(statuses=None)
        assert rows and not any(b'FormOID="F.VS"' in r.odm for r in rows), "vital signs wait for review"
        held, total = rec.query(DiscrepancyFilter(study_oid="CV01", kinds=(DiscrepancyKind.REVIEW_REQUIRED.value,)),
                                limit=500, offset=0)
        assert total > 0 and all(d.discrepancy.form_oid == "F.VS" for d in held)
        rec.accept("CV01", held[0].id, actor="user:dm1", reason="checked against the source")
        with container.store.uow(read_only=True) as uow:
            after = uow.outbox_entries(statuses=None)
        assert len(after) == len(rows) + 1 and b'FormOID="F.VS"' in after[-1].odm
    finally:
        container.close()
