"""``make bench``: ``breakfix signals kmsg`` over 100,000 mixed kernel-log lines, beside a plain regex pass.

Writes a file of 100,000 lines in every prefix the kmsg rules read (dmesg ``[ts]``, ``dmesg -T``, syslog,
journald ISO, raw ``/dev/kmsg``), one in ten an NVIDIA fault line (XID, MIG Xid, SXid, fallen off the bus,
GPU map lines), the rest ordinary kernel noise. Times, in the same run: (1) one ``re`` search for
``NVRM: Xid`` over every line (the floor: what any grep-like pass costs); (2) the whole command in a child
process (``breakfix signals kmsg FILE --node n --boot-time ...``: start-up, format check, parsing, signal
building, JSON output). Reported as wall seconds, the child's CPU seconds (the figure that does not depend on
how busy a shared machine is) and the ratio; the target is under 5 s for the command.
"""

from __future__ import annotations

import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LINES = 100_000
FAULTS = (
    "NVRM: Xid (PCI:0000:{b:02x}:00): 48, pid='<unknown>', name=<unknown>, An uncorrectable double bit error",
    "NVRM: Xid (PCI:0000:{b:02x}:00 GPU-I:05): 94, pid=12087, name=python3, Contained: CE User Channel (0x9)",
    "NVRM: Xid (PCI:0000:{b:02x}:00): 13, pid=2924364, name=pt_main_thread, Graphics SM Warp Exception",
    "nvidia-nvswitch0: SXid (PCI:0000:{b:02x}:00.0): 20009, Non-fatal, Link 04 RX Short Error Rate",
    "NVRM: GPU at PCI:0000:{b:02x}:00: GPU-8a47641b-dff6-f09f-618c-c3eb58fb{b:04x}",
    "NVRM: GPU 0000:{b:02x}:00.0: GPU has fallen off the bus.",
)
NOISE = ("usb 1-1: new high-speed USB device number 2 using xhci_hcd",
         "EXT4-fs (nvme0n1p2): mounted filesystem with ordered data mode. Quota mode: none.",
         "mlx5_core 0000:3b:00.0: mlx5_pcie_event:301: PCIe slot advertised sufficient power (75W).",
         "NVRM: loading NVIDIA UNIX x86_64 Kernel Module  550.54.15  Tue Mar  5 22:23:56 UTC 2024",
         "audit: type=1400 audit(1717000000.123:45): apparmor=\"STATUS\" operation=\"profile_load\"")


def _prefix(i: int) -> str:
    t = 1000 + i * 0.01
    kind = i % 5
    if kind == 0:
        return f"[{t:12.6f}] "
    if kind == 1:
        return f"[Tue Mar  4 09:{(i // 60) % 60:02d}:{i % 60:02d} 2025] "
    if kind == 2:
        return f"Mar  4 09:{(i // 60) % 60:02d}:{i % 60:02d} gpu-node-17 kernel: "
    if kind == 3:
        return f"2025-03-04T09:{(i // 60) % 60:02d}:{i % 60:02d}+0000 gpu-node-17 kernel: "
    return f"4,{i},{int(t * 1e6)},-;"


def write_log(path: Path, lines: int = LINES) -> int:
    faults = 0
    with path.open("w") as fh:
        for i in range(lines):
            if i % 10 == 0:
                text = FAULTS[(i // 10) % len(FAULTS)].format(b=(i // 10) % 256)
                faults += 1
            else:
                text = NOISE[i % len(NOISE)]
            fh.write(_prefix(i) + text + "\n")
    return faults


def bench_kmsg_cli() -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="breakfix-bench-kmsg-") as d:
        log = Path(d) / "kern.log"
        write_log(log)
        pattern = re.compile(r"NVRM: Xid \((?:PCI:)?([0-9a-fA-F:.]+)[^)]*\): (\d+)")
        start, cpu = time.perf_counter(), time.process_time()
        matched = sum(1 for line in log.read_text().splitlines() if pattern.search(line))
        regex_s, regex_cpu = time.perf_counter() - start, time.process_time() - cpu
        start = time.perf_counter()
        cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run([sys.executable, "-c", "from breakfix.cli.main import app; app()", "signals", "kmsg",
                               str(log), "--node", "n", "--boot-time", "2025-03-04T00:00:00Z"],
                              capture_output=True, text=True, check=False)
        cli_s = time.perf_counter() - start
        cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cli_cpu = (cpu_after.ru_utime + cpu_after.ru_stime) - (cpu_before.ru_utime + cpu_before.ru_stime)
        signals = proc.stdout.count("\n")
    return {"lines": LINES, "regex_pass_s": round(regex_s, 3), "regex_matches": matched,
            "breakfix_signals_kmsg_s": round(cli_s, 3), "breakfix_signals_kmsg_cpu_s": round(cli_cpu, 3),
            "signals": signals, "exit_code": proc.returncode,
            "ratio_to_regex": round(cli_s / regex_s, 1) if regex_s else 0.0,
            "cpu_ratio_to_regex": round(cli_cpu / regex_cpu, 1) if regex_cpu else 0.0, "target_s": 5.0}


if __name__ == "__main__":
    import json

    print(json.dumps(bench_kmsg_cli(), indent=2))
