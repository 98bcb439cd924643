"""Start-up time per command: seconds from a fresh interpreter to the end of the imports a ``medfm`` command makes.

Each command's import path (what ``medfm <command>`` imports before its work starts) runs in a fresh interpreter,
``--runs`` times; printed: the median seconds and whether torch / MONAI were imported. Goals (issue 15): crop ≤ 1 s
without torch or MONAI, probe without torch, extract ≤ 3 s. ``python -X importtime -c "<code>"`` of one row's code
shows where its time goes.
Run: ``.venv/bin/python benchmarks/import_time.py [--runs 5]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from harness import report

# The imports each command makes (cli.py's handler for it imports these when it runs).
COMMANDS = {
    "crop": "import medfm.cli; import medfm.data.crop, medfm.data.manifest, medfm.data.profiles",
    "probe": "import medfm.cli; import medfm.evaluate.probe",
    "extract": "import medfm.cli; import medfm.data.manifest, medfm.features.extract, medfm.models.registry",
    "models": "import medfm.cli; import medfm.models.registry, medfm.data.profiles",
}
PROBE = "; import sys, time, json; print(json.dumps([time.perf_counter() - START, 'torch' in sys.modules, 'monai' in sys.modules]))"


def one_run(code: str) -> tuple[float, bool, bool]:
    """(seconds, torch imported, MONAI imported) of ``code`` in a fresh interpreter."""
    script = "import time; START = time.perf_counter(); " + code + PROBE
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    seconds, torch, monai = json.loads(out.strip().splitlines()[-1])
    return float(seconds), bool(torch), bool(monai)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for command, code in COMMANDS.items():
        runs = [one_run(code) for _ in range(args.runs)]
        rows.append(
            {
                "command": command,
                "median_s": statistics.median(r[0] for r in runs),
                "min_s": min(r[0] for r in runs),
                "torch": runs[0][1],
                "monai": runs[0][2],
            }
        )
    report("import_time", rows, vars(args))


if __name__ == "__main__":
    main()
