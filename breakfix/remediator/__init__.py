"""The remediator: turns incidents into plans and carries them out, leaving an audit trail.

Input: ``IncidentChange``s from ``breakfix.incidents.>``. Output: ``ActionRecord``s on
``breakfix.actions.<cluster>``. ``remediator.decide`` is the pure decision; the executor
is the only place effects happen, through actuator adapters (``remediator.simcluster``).
"""
