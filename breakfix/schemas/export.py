"""Export the contracts as JSON Schema files under ``schemas/json/``.

``breakfix schema export`` writes them; a test fails when the committed files differ from
what the models produce, so integrators never read a stale contract.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from breakfix.schemas.agent import AgentCommand, AgentReply
from breakfix.schemas.incident import ActionRecord, Incident, IncidentChange, Plan
from breakfix.schemas.signal import Signal

JSON_DIR = Path(__file__).resolve().parent / "json"

MODELS: dict[str, type[BaseModel]] = {
    "signal.v1.json": Signal,
    "incident.v1.json": Incident,
    "incident-change.v1.json": IncidentChange,
    "plan.v1.json": Plan,
    "action.v1.json": ActionRecord,
    "agent-command.v1.json": AgentCommand,
    "agent-reply.v1.json": AgentReply,
}


def render() -> dict[str, str]:
    """File name -> JSON text, deterministic."""
    out: dict[str, str] = {}
    for name, model in MODELS.items():
        schema = model.model_json_schema(by_alias=True, mode="serialization")
        schema["$id"] = f"https://breakfix.dev/schemas/{name}"
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        out[name] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def export(directory: Path = JSON_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render().items():
        p = directory / name
        p.write_text(text, encoding="utf-8")
        written.append(p)
    return written


def stale(directory: Path = JSON_DIR) -> list[str]:
    """Names of files that are missing or differ from the models."""
    bad = []
    for name, text in render().items():
        p = directory / name
        if not p.exists() or p.read_text(encoding="utf-8") != text:
            bad.append(name)
    return bad
