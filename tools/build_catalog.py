"""Regenerate ``schemas/catalog/*.csv`` from the team's NVIDIA reference extracts.

Run by a developer, never at run or test time:

    python tools/build_catalog.py ../shared/reference

It reads ``xid_catalog_detail.csv`` (resolution buckets per XID, NVIDIA Xid-Catalog.xlsx),
``xid_catalog.csv`` (per-entry source citations) and ``dcgm_fr_to_action_nvsentinel.csv``,
and writes the trimmed copies that ``schemas.catalog`` loads at start-up. The DCGM codes breakfix
adds to NVSentinel's map (``tools/dcgm_fr_additions.csv``, each row citing its DCGM source) are
appended after the upstream rows, unless upstream has the code by then.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "breakfix" / "schemas" / "catalog"
ADDITIONS = Path(__file__).resolve().parent / "dcgm_fr_additions.csv"


def main(ref: Path, out: Path = OUT) -> None:
    sources = {r["xid"]: r["source"] for r in csv.DictReader((ref / "xid_catalog.csv").open())}
    rows = list(csv.DictReader((ref / "xid_catalog_detail.csv").open()))
    with (out / "xid_catalog.csv").open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(
            ["xid", "mnemonic", "description", "immediate_bucket", "investigatory_bucket",
             "default_domain", "applies_a100", "applies_h100", "applies_b100", "applies_gb200", "source"]
        )
        for r in rows:
            w.writerow(
                [r["xid"], r["mnemonic"], r["description"].replace("\n", " "), r["immediate_action"],
                 r["investigatory_action"].replace("\n", " "), r["domain"], r["applies_A100"],
                 r["applies_H100"], r["applies_B100"], r["applies_GB200"], sources[r["xid"]]]
            )
    with (out / "dcgm_fr_catalog.csv").open("w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["code", "nvsentinel_action", "source"])
        upstream = set()
        for r in csv.DictReader((ref / "dcgm_fr_to_action_nvsentinel.csv").open()):
            upstream.add(r["dcgm_fr_code"])
            w.writerow([r["dcgm_fr_code"], r["nvsentinel_recommended_action"],
                        "NVIDIA/NVSentinel gpu-health-monitor dcgmerrorsmapping.csv"])
        for r in csv.DictReader(ADDITIONS.open()):
            if r["code"] not in upstream:
                w.writerow([r["code"], r["nvsentinel_action"], r["source"]])


if __name__ == "__main__":
    main(Path(sys.argv[1]))
