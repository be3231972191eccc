"""The SRE console (``breakfix console``) and the on-call verbs' backend shared with the CLI.

Layer 4, below ``breakfix.cli`` and above the stages: it reads the incident index and the audit
trail over NATS and publishes audited on-call ``ActionRecord``s; no stage imports it.
"""
