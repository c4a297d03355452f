#!/usr/bin/env python3
"""Sanity-check the python-tuf fixtures with python-tuf's own client.

Usage: check_fixtures.py [FIXTURES_DIR] [--scenario NAME ...]
       (default FIXTURES_DIR: <repo>/tests/fixtures/python-tuf)

For every scenario, serves the scenario directory over HTTP on 127.0.0.1 and
runs tuf.ngclient.Updater from the scenario's trusted root: refresh, then look
up and download every listed target (see ngclient_download.run).

"ok" scenarios must succeed, otherwise the exit status is 1. Bad scenarios are
only reported: ngclient is not expected to reject all of them (some checks are
stricter in Tern than in python-tuf), and the summary names those it accepted.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

# Keep interop/ free of __pycache__ (the import below is from this directory,
# which is on sys.path as the script's own directory).
sys.dont_write_bytecode = True
from ngclient_download import run  # noqa: E402

DEFAULT_FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "python-tuf"


def main() -> int:
    parser = argparse.ArgumentParser(description="Check fixtures with python-tuf ngclient.")
    parser.add_argument("fixtures_dir", nargs="?", type=Path, default=DEFAULT_FIXTURES)
    parser.add_argument("--scenario", action="append", metavar="NAME",
                        help="check only this scenario (repeatable)")
    args = parser.parse_args()

    scenario_dirs = sorted(p.parent for p in args.fixtures_dir.glob("*/scenario.json"))
    if args.scenario:
        scenario_dirs = [d for d in scenario_dirs if d.name in args.scenario]
        missing = set(args.scenario) - {d.name for d in scenario_dirs}
        if missing:
            print(f"unknown scenario(s): {', '.join(sorted(missing))}", file=sys.stderr)
            return 2
    if not scenario_dirs:
        print(f"no scenarios found under {args.fixtures_dir}", file=sys.stderr)
        return 2

    failures: list[str] = []
    accepted_bad: list[str] = []
    for scenario_dir in scenario_dirs:
        spec = json.loads((scenario_dir / "scenario.json").read_text())
        with tempfile.TemporaryDirectory(prefix="tern-ngclient-") as work_dir:
            result = run(scenario_dir, scenario_dir / spec["trusted_root"],
                         Path(work_dir), spec["targets"])

        name = scenario_dir.name
        if spec["expect"] == "ok":
            if result["ok"]:
                status = "PASS   ok, ngclient succeeded"
            else:
                status = f"FAIL   ok, ngclient failed: {result['error']}"
                failures.append(name)
        else:
            want = f"{spec['expect']['error']}/{spec['expect']['role']}"
            if result["ok"]:
                status = f"NOTE   {want}, ngclient ACCEPTED it"
                accepted_bad.append(name)
            else:
                status = f"PASS   {want}, ngclient rejected: {result['error']}"
        print(f"{name:24} {status}")

    print()
    print(f"{len(scenario_dirs)} scenarios checked; "
          f"{len(failures)} ok-scenario failure(s): {', '.join(failures) or 'none'}")
    print(f"bad scenarios ngclient did not reject: {', '.join(accepted_bad) or 'none'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
