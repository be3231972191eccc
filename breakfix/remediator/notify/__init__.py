"""Notifications to on-call: one page per root cause, through Alertmanager, PagerDuty, Slack or a webhook.

``config`` (the remediator config's ``notify`` section) -> ``core`` (pure: what to notify, from incident
changes and audit records) -> ``sender`` (bounded queues, retries, audit records) -> ``channels`` (the
HTTP payloads). ``service.NotifierService`` runs it inside the remediator daemon.
"""

from breakfix.remediator.notify.config import NotifyConfig
from breakfix.remediator.notify.model import Notification, NotifyAction, NotifyEvent

__all__ = ["Notification", "NotifyAction", "NotifyConfig", "NotifyEvent"]
