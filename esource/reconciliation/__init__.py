"""Reconciliation: the discrepancy queue's actions (accept, override, dismiss, re-map, re-push, assign,
review, in bulk), the review-before-send policy per form, and the source-data-verification report
comparing what esource sent with what the EDC holds.

    from esource.reconciliation.actions import Reconciliation   # the actions (one unit of work each)
    from esource.reconciliation.policy import hold_for_review   # pure: (study, changes) -> (send, held)
    from esource.reconciliation.report import reconcile         # SDV report (JSON-ready, CSV)

Nothing is imported here, so the store can use `esource.reconciliation.model` without cycles.
"""
