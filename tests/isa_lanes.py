"""``make test-isa``: the hardware-sensitive tests (``-m isa``) once per instruction-set class below this CPU's own,
each in a pytest process started under that class's caps (``ONEDNN_MAX_CPU_ISA``, ``ATEN_CPU_CAPABILITY``): oneDNN
and ATen read them once, at start-up, so a cap cannot be set from inside a running test. Prints a table."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from charlm.hardware import describe_isa, isa_lanes


def main(argv: list[str]) -> int:
    lanes = isa_lanes()
    print(f"isa lanes: this CPU runs as {describe_isa()}; lanes below it: {', '.join(c.name for c in lanes) or 'none'}")
    rows, failed = [], False
    for lane in lanes:
        env = os.environ | {
            "ONEDNN_MAX_CPU_ISA": lane.onednn,
            "ATEN_CPU_CAPABILITY": lane.aten,
            "CHARLM_ISA_LANE": lane.name,
        }
        cmd = [sys.executable, "-m", "pytest", "-q", "-m", "isa", "-n", "auto", "--maxprocesses=4", *argv]
        print(f"--- lane {lane.name}: ONEDNN_MAX_CPU_ISA={lane.onednn} ATEN_CPU_CAPABILITY={lane.aten}", flush=True)
        start = time.monotonic()
        proc = subprocess.run(cmd, env=env)
        seconds = time.monotonic() - start
        failed |= proc.returncode != 0
        rows.append(
            (
                lane.name,
                lane.onednn,
                lane.aten,
                "passed" if proc.returncode == 0 else f"FAILED ({proc.returncode})",
                seconds,
            )
        )
    if rows:
        print(
            "\n| lane | ONEDNN_MAX_CPU_ISA | ATEN_CPU_CAPABILITY | result | seconds |\n| --- | --- | --- | --- | --- |"
        )
        for name, onednn, aten, result, seconds in rows:
            print(f"| {name} | {onednn} | {aten} | {result} | {seconds:.0f} |")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
