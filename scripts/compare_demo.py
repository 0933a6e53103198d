"""Compare two `clipforge demo` results.json files: every claim by id (wall and data-build time aside), then
every other results section outside timings, checkpoints and config. Exit 1 when a compared claim differs.

    python scripts/compare_demo.py BEFORE/runs/demo/results.json AFTER/runs/demo/results.json
"""
from __future__ import annotations

import json
import sys

TIMING_CLAIMS = ("wall-time", "data-build-time")
NOT_RESULTS = {"timings", "checkpoints", "config", "claims", "summary"}


def main(before_path: str, after_path: str) -> int:
    """Print what differs between the two runs; 1 when a claim differs, else 0."""
    with open(before_path) as a, open(after_path) as b:
        before, after = json.load(a), json.load(b)
    old = {c["id"]: c for c in before["claims"]}
    new = {c["id"]: c for c in after["claims"]}
    compared = [k for k in old if k not in TIMING_CLAIMS]
    differ = [k for k in compared if old[k] != new.get(k)]
    print(f"claims: {len(old)} before, {len(new)} after; {len(compared)} compared; {len(differ)} differ")
    for key in differ:
        print(f"  {key}: {old[key]['value']} -> {new.get(key, {}).get('value')}")
    sections = [k for k in before if k not in NOT_RESULTS]
    print(f"other sections: {len(sections)} compared; differ: {[k for k in sections if before[k] != after.get(k)]}")
    config = {k: (v, after["config"].get(k)) for k, v in before["config"].items() if v != after["config"].get(k)}
    print(f"config differences: {config}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
