"""esource: FHIR patient summaries to CDISC ODM eCRFs."""
__version__ = "0.1.0"
