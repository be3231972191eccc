"""What a silence covers: the one matching rule the console (which lists and shows silences) and the
remediator's notifier (which holds notifications back) share.

A silence is an on-call ``ActionRecord`` (kind ``silence``) whose ``details.matcher`` is a JSON object
with ``cluster`` and any of ``node``, ``category`` and ``code``; every field it names must match.
A code matches as written (``xid:48``) or by its number alone (``48``). Silences hold notifications
back; they never stop remediation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

MATCHER_KEYS = frozenset({"cluster", "node", "category", "code"})


def silence_matches(matcher: Mapping[str, str], *, cluster: str, category: str, nodes: Iterable[str | None],
                    codes: Iterable[str]) -> bool:
    """Whether ``matcher`` covers an incident with these facts."""
    if matcher.get("cluster") != cluster:
        return False
    if "node" in matcher and matcher["node"] not in set(nodes):
        return False
    if "category" in matcher and matcher["category"] != category:
        return False
    code = matcher.get("code")
    return code is None or any(code in (c, c.partition(":")[2]) for c in codes)
