"""Collectors: turn raw readings on a node (or across the fleet) into ``Signal``s on NATS.

Each source is a pure rule part (reading -> ``edge.Cycle`` of signals) wrapped as a plugin
(``source.Source`` / ``source.Watcher``) registered under its config section
(``sources.py``). ``app.build_collector`` composes the node daemon (``daemon.py``): plugins ->
``edge.EdgeFilter`` -> ``forwarder.Forwarder`` -> ``breakfix.signals.<cluster>.<node>``, with
the on-disk ``spool.Spool`` while NATS is away, and the node agent (``agent.py``) on
``breakfix.agent.<cluster>.<node>``. ``app.build_fleet_collector`` does the same for the
PromQL fleet rules (``promfleet.py``, ``fleetd.py``); ``sim.py`` replays scenarios for the demo.
Collectors never import the correlator or remediator.
"""
