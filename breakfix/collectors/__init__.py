"""Collector sources: turn raw readings into ``Signal``s and publish them to NATS.

Each source is a module with a pure rule part (reading -> signals) and a thin runner.
Sources never import the correlator or remediator; they publish on
``breakfix.signals.<cluster>.<node>`` through ``collectors.publisher``.
"""
