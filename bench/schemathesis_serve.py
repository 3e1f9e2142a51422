"""Fuzz `acteng serve` with schemathesis from its own /openapi.json: 0 server errors.

Starts ``acteng serve`` on the default model (loopback, small limits so each generated
request decodes a few tokens, an admin key so the vector routes are exercised too) and runs
schemathesis over every operation with every check. The floor is the ``not_a_server_error``
check: no 5xx, whatever schemathesis sends. The other checks' findings (a status code the
schema does not list, say) are reported as they are.

schemathesis lives in its own environment, never in acteng's dependencies:

    python3 -m venv .venv-fuzz && .venv-fuzz/bin/pip install schemathesis==4.32.5
    .venv/bin/python bench/schemathesis_serve.py --examples 50     # ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from _common import served

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
ADMIN = "admin-key-for-the-fuzz-run"


def failures(junit: Path) -> dict[str, list[str]]:
    """check name -> the operations it failed on, from schemathesis's JUnit report."""
    found: dict[str, list[str]] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        for bad in [*case.findall("failure"), *case.findall("error")]:
            text = (bad.get("message") or "") + "\n" + (bad.text or "")
            titles = re.findall(r"^\s*-\s*([A-Z][^\n]+)$", text, flags=re.M) or ["error"]
            for title in titles:
                found.setdefault(title.strip(), []).append(case.get("name", "?"))
    return found


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=50, help="max examples per operation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--st", default=str(ROOT / ".venv-fuzz" / "bin" / "st"))
    args = parser.parse_args()
    if not Path(args.st).exists():
        raise SystemExit(f"{args.st} not found: see this script's docstring for the set-up")
    RESULTS.mkdir(parents=True, exist_ok=True)
    home = RESULTS / "schemathesis-home"
    env = {"ACTENG_HOME": str(home), "ACTENG_ADMIN_KEY": ADMIN}
    junit = RESULTS / "schemathesis.xml"
    started = time.monotonic()
    with served(["--max-tokens", "4", "--slots", "4"], env) as url:
        command = [
            args.st,
            "run",
            f"{url}/openapi.json",
            "--checks",
            "all",
            "--max-examples",
            str(args.examples),
            "--seed",
            str(args.seed),
            "--header",
            f"Authorization: Bearer {ADMIN}",
            "--continue-on-failure",
            "--request-timeout",
            "120",
            "--report",
            "junit",
            "--report-junit-path",
            str(junit),
        ]
        # run in bench/results: schemathesis keeps a .schemathesis cache where it runs
        run = subprocess.run(command, capture_output=True, text=True, check=False, cwd=RESULTS)
        (RESULTS / "schemathesis.log").write_text(run.stdout + run.stderr, encoding="utf-8")
    found = failures(junit) if junit.exists() else {"no report": []}
    server_errors = {k: v for k, v in found.items() if "server error" in k.lower()}
    result = {
        "seconds": round(time.monotonic() - started, 1),
        "examples_per_operation": args.examples,
        "server_errors": server_errors,
        "other_findings": {k: sorted(set(v)) for k, v in found.items() if k not in server_errors},
        "test_cases": [line.strip() for line in run.stdout.splitlines() if "generated" in line],
        "exit_code": run.returncode,
    }
    (RESULTS / "schemathesis.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(json.dumps(result, indent=2))
    print("server errors:", sum(len(v) for v in server_errors.values()), "(floor: 0)")


if __name__ == "__main__":
    main()
