"""The correlator: groups signals into incidents and follows their lifecycle.

Input: ``Signal``s from ``breakfix.signals.>`` and ``ActionRecord``s from
``breakfix.actions.>``. Output: ``IncidentChange``s on ``breakfix.incidents.<cluster>``.
The grouping core (``correlator.grouping``) is pure; ``correlator.service`` does the I/O.
"""
