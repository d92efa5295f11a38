"""Write tests/data/benchmark_corpus_sample.json: the manifest hashes of a few clips of each
benchmark corpus (per evaluated split, the first clip of every voice), taken from the
cached build that the committed accuracy cells were computed on. The test
`test_benchmark_corpora_reproduce_bit_exactly` re-renders those clips on the machine it runs
on (CI: a fresh one) and compares.

    .venv/bin/python scripts/sample_corpus_hashes.py
"""

from __future__ import annotations

import json
from pathlib import Path

from esc_ao.corpus import CORPORA, cache_root
from esc_ao.corpus.builder import content_digest
from esc_ao.report import write_text_atomic

SPLITS = ("calibration", "test")  # the splits the accuracy cells are keyed by
OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "benchmark_corpus_sample.json"


def sample(manifest: dict) -> dict[str, str]:
    first: dict[tuple[str, str], dict] = {}
    for item in sorted(manifest["items"], key=lambda i: i["id"]):
        if item["split"] in SPLITS:
            first.setdefault((item["split"], item["voice"]), item)
    return {item["id"]: item["sha256"] for item in sorted(first.values(), key=lambda i: i["id"])}


def main() -> None:
    out = {}
    for name in CORPORA:
        manifest = json.loads((cache_root() / "corpora" / name / "manifest.json").read_text())
        out[name] = {"fingerprint": manifest["fingerprint"], "engines": manifest["engines"],
                     "content_digest": content_digest(manifest, SPLITS), "items": sample(manifest)}
    write_text_atomic(OUT, json.dumps(out, indent=1, sort_keys=True) + "\n")
    print(f"{OUT}: " + ", ".join(f"{n} {len(v['items'])} clips" for n, v in out.items()))


if __name__ == "__main__":
    main()
