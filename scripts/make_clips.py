"""Regenerates the bundled speech clips (src/esc_ao/data/clips) with Debian's TTS voices.

Run once by a developer (needs `apt-get install flite espeak-ng sox`); the clips are
committed so that users and CI need no TTS engine. Sentences are written for this project
(public domain). Output: 16 kHz mono 16-bit WAV files and manifest.json.

    python scripts/make_clips.py
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "esc_ao" / "data" / "clips"

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Please set the kitchen timer for twelve minutes and turn on the oven.",
    "Our train to the coast leaves at half past seven tomorrow morning.",
    "She measured the voltage twice before she replaced the old battery.",
    "A gentle wind moved the tall grass across the quiet valley.",
    "Call the front desk and ask them to bring two extra pillows.",
    "The meeting has been moved to Thursday afternoon in room four.",
    "He painted the fence green because the red paint had run out.",
    "Turn left at the second light and park behind the library.",
    "Seven hundred people attended the concert in the old town hall.",
    "The children built a small boat out of cardboard and tape.",
    "Remember to water the tomato plants before the sun goes down.",
    "The pilot announced that we would land twenty minutes early.",
    "Fresh bread and warm soup were waiting for us at the farmhouse.",
    "Nine students solved the puzzle before the bell rang.",
    "Switch off the lights in the hallway when you leave the house.",
]
# (engine, voice): held-out clips use voices that calibration never hears.
VOICES = [
    ("flite", "kal16"),
    ("flite", "awb"),
    ("flite", "slt"),
    ("espeak-ng", "en-us"),
    ("flite", "rms"),
    ("espeak-ng", "en-gb"),
]


def synthesize(engine: str, voice: str, text: str, dst: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.wav"
        if engine == "flite":
            subprocess.run(["flite", "-voice", voice, "-t", text, "-o", str(raw)], check=True)
        else:
            subprocess.run(["espeak-ng", "-v", voice, "-w", str(raw), text], check=True)
        subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", "-b", "16", str(dst)], check=True)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    entries = []
    for i, text in enumerate(SENTENCES):
        engine, voice = VOICES[i % 4] if i < 12 else VOICES[4 + i % 2]
        name = f"clip{i:02d}_{engine}_{voice}.wav"
        synthesize(engine, voice, text, OUT / name)
        entries.append(
            {
                "file": name,
                "text": text,
                "engine": engine,
                "voice": voice,
                "split": "calibration" if i < 12 else "heldout",
                "sample_rate": 16000,
            }
        )
    (OUT / "manifest.json").write_text(
        json.dumps({"licence": "public domain (written for esc-ao)", "clips": entries}, indent=1) + "\n"
    )


if __name__ == "__main__":
    main()
