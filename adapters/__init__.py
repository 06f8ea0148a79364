"""EHR-side inbound adapters (files, FHIR HTTP, Kafka). Installed as ``esource.adapters``."""
