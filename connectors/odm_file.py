"""File drop: each transaction as one ODM file in a folder, written atomically, for EDCs that
collect files (and for the demo). The file name carries the transaction key, so a re-sent
transaction overwrites itself instead of creating a second file.

A write the operating system refuses for lack of rights (`PermissionError`: the service account may
not write to the share) is `EdcAuthenticationError`: no file could be written until the rights are
fixed, so the dispatcher stops the drop and keeps every transaction pending. Other OS errors (a busy
or unreachable share) are transient."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from esource.domain.model import SubjectTransaction
from esource.domain.ports import ConnectorCapabilities, DeliveryReceipt
from esource.services.dispatch import EdcAuthenticationError


class OdmFileConnector:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def capabilities(self) -> ConnectorCapabilities:
        return ConnectorCapabilities("odm_file", read_back=False, idempotency_key=True, integer_repeat_keys=False)

    def file_name(self, tx: SubjectTransaction) -> str:
        return f"{tx.study_oid}_{tx.subject_key}_{tx.sequence:06d}.xml"

    def send(self, transaction: SubjectTransaction, odm: bytes) -> DeliveryReceipt:
        target = self.folder / self.file_name(transaction)
        try:
            self._write(target, odm)
        except PermissionError as exc:
            raise EdcAuthenticationError(f"ODM file drop {self.folder}: no right to write "
                                         f"{target.name} ({exc.strerror or exc})", code="EACCES") from None
        return DeliveryReceipt(accepted=True, reference=target.name)

    def _write(self, target: Path, odm: bytes) -> None:
        """Write atomically: a collector never sees a half-written file."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=".xml", dir=self.folder)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(odm)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def read_back(self, study_oid: str, subject_key: str) -> bytes | None:
        return None
