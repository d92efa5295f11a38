"""Record the reference figures of every numerics part at its declared version into
tests/data/numerics_reference.json (esc_ao.bench.numerics says what they guard). Run it
after bumping a version for a deliberate change of numbers; parts whose version is
unchanged keep their recorded figures unless --force.

    .venv/bin/python scripts/record_numerics.py [--parts quantization search ...] [--force]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from esc_ao.bench.numerics import NUMERICS, PARTS, reference_figures
from esc_ao.report import write_text_atomic

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "numerics_reference.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=list(PARTS), choices=PARTS)
    ap.add_argument("--force", action="store_true", help="re-record parts whose version did not change")
    args = ap.parse_args()
    torch.set_num_threads(1)  # as the test runs them
    recorded = json.loads(OUT.read_text()) if OUT.exists() else {}
    for part in args.parts:
        if not args.force and recorded.get(part, {}).get("version") == NUMERICS[part]:
            print(f"{part}: version {NUMERICS[part]} already recorded (--force re-records)")
            continue
        recorded[part] = {"version": NUMERICS[part], "figures": reference_figures(part)}
        print(f"{part}: version {NUMERICS[part]} recorded")
    write_text_atomic(OUT, json.dumps(recorded, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
