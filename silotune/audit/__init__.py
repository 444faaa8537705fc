"""Audits of a trained adapter: membership inference, backdoor success (evaluation of defenses)."""

from silotune.audit.backdoor import BackdoorResult, backdoor_success
from silotune.audit.metrics import roc_auc, roc_curve, tpr_at_fpr
from silotune.audit.mia import MIAResult, example_losses, membership_inference
from silotune.audit.run import AuditReport, audit_federation, audit_markdown, plot_audit

__all__ = [
    "AuditReport",
    "BackdoorResult",
    "MIAResult",
    "audit_federation",
    "audit_markdown",
    "backdoor_success",
    "example_losses",
    "membership_inference",
    "plot_audit",
    "roc_auc",
    "roc_curve",
    "tpr_at_fpr",
]
