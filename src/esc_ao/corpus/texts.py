"""The text of the corpora, generated from esc-ao's own grammar and word lists.

Nothing is downloaded: every sentence, digit string, command and keyword list below was
written for esc-ao and is released with it into the public domain (``TEXT_LICENCE``). The
35 keywords are the label set of Speech Commands V2 (Warden, 2018): a list of English
words, not the dataset's audio.

Texts are lower-case words separated by single spaces, digits spelled out, so the TTS input
and the ASR target are the same string.
"""

from __future__ import annotations

import numpy as np

__all__ = ["KEYWORDS", "TEXT_LICENCE", "UNKNOWN_WORDS", "command", "digit_string", "sentence"]

TEXT_LICENCE = "public domain: grammar and word lists written for esc-ao (esc_ao/corpus/texts.py)"

# Speech Commands V2's 35 keywords (the label names).
KEYWORDS: tuple[str, ...] = (
    "backward",
    "bed",
    "bird",
    "cat",
    "dog",
    "down",
    "eight",
    "five",
    "follow",
    "forward",
    "four",
    "go",
    "happy",
    "house",
    "learn",
    "left",
    "marvin",
    "nine",
    "no",
    "off",
    "on",
    "one",
    "right",
    "seven",
    "sheila",
    "six",
    "stop",
    "three",
    "tree",
    "two",
    "up",
    "visual",
    "wow",
    "yes",
    "zero",
)
# Words that are not keywords: the "unknown" class.
UNKNOWN_WORDS: tuple[str, ...] = (
    "apple",
    "window",
    "garden",
    "yellow",
    "river",
    "pencil",
    "monday",
    "coffee",
    "paper",
    "little",
    "water",
    "travel",
    "button",
    "orange",
    "silver",
    "doctor",
    "winter",
    "bottle",
    "kitchen",
    "morning",
    "purple",
    "rabbit",
    "table",
    "tiger",
    "ocean",
    "mirror",
    "jacket",
    "summer",
    "bridge",
    "candle",
    "pocket",
    "lemon",
    "forest",
    "music",
    "number",
    "planet",
    "rocket",
    "basket",
    "castle",
    "dinner",
)

_DETS = ("the", "a", "this", "that", "my", "our", "your", "every", "one")
_ADJS = (
    "small",
    "large",
    "old",
    "new",
    "green",
    "red",
    "blue",
    "quiet",
    "loud",
    "bright",
    "dark",
    "warm",
    "cold",
    "heavy",
    "light",
    "quick",
    "slow",
    "clever",
    "happy",
    "tired",
    "empty",
    "full",
    "strange",
    "gentle",
    "wooden",
    "broken",
    "simple",
    "famous",
    "early",
    "late",
    "busy",
    "careful",
    "young",
    "tall",
    "short",
    "round",
    "soft",
    "sharp",
    "clean",
)
_NOUNS = (
    "dog",
    "cat",
    "teacher",
    "farmer",
    "doctor",
    "child",
    "pilot",
    "river",
    "mountain",
    "garden",
    "kitchen",
    "window",
    "table",
    "letter",
    "story",
    "machine",
    "engine",
    "bicycle",
    "boat",
    "train",
    "station",
    "market",
    "village",
    "city",
    "forest",
    "field",
    "bridge",
    "house",
    "door",
    "lamp",
    "book",
    "song",
    "painter",
    "student",
    "neighbour",
    "baker",
    "sailor",
    "driver",
    "friend",
    "brother",
    "sister",
    "mother",
    "father",
    "horse",
    "bird",
    "fish",
    "apple",
    "basket",
    "bottle",
    "camera",
    "radio",
    "clock",
    "phone",
    "computer",
    "road",
    "hill",
    "island",
    "ocean",
    "storm",
    "morning",
    "evening",
    "winter",
    "summer",
    "meeting",
    "concert",
    "picture",
    "garden",
    "office",
    "hotel",
    "library",
    "museum",
    "school",
    "hospital",
    "shop",
    "captain",
    "singer",
    "writer",
)
_VERBS_T = (
    "found",
    "painted",
    "carried",
    "opened",
    "closed",
    "watched",
    "cleaned",
    "fixed",
    "moved",
    "sold",
    "bought",
    "visited",
    "followed",
    "helped",
    "called",
    "finished",
    "washed",
    "built",
    "found",
    "dropped",
    "lifted",
    "counted",
    "described",
    "remembered",
    "noticed",
    "answered",
    "borrowed",
    "checked",
    "covered",
    "filled",
    "pulled",
    "pushed",
)
_VERBS_I = (
    "waited",
    "smiled",
    "laughed",
    "arrived",
    "listened",
    "walked",
    "worked",
    "slept",
    "travelled",
    "stayed",
    "played",
    "jumped",
    "danced",
    "rested",
    "stopped",
    "started",
)
_PREPS = ("near", "behind", "under", "beside", "inside", "across", "above", "around", "past", "towards", "outside")
_TIMES = (
    "yesterday",
    "today",
    "tonight",
    "last week",
    "on monday",
    "in the morning",
    "after dinner",
    "before noon",
    "every day",
    "twice",
    "again",
    "later",
)
_NAMES = (
    "anna",
    "peter",
    "maria",
    "james",
    "laura",
    "david",
    "sarah",
    "thomas",
    "emma",
    "daniel",
    "sophie",
    "robert",
    "helen",
    "michael",
    "julia",
    "oliver",
)
_IMPERATIVES = ("please", "now", "quickly", "carefully", "later")

_DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_CMD_VERBS = (
    "turn on",
    "turn off",
    "open",
    "close",
    "start",
    "stop",
    "pause",
    "play",
    "dim",
    "lock",
    "unlock",
    "mute",
    "check",
)
_CMD_OBJECTS = (
    "the lights",
    "the music",
    "the radio",
    "the door",
    "the window",
    "the heater",
    "the fan",
    "the oven",
    "the timer",
    "the alarm",
    "the camera",
    "the television",
    "the garage",
    "the blinds",
    "the kettle",
)
_CMD_PLACES = (
    "in the kitchen",
    "in the bedroom",
    "in the hallway",
    "in the garden",
    "in the office",
    "upstairs",
    "downstairs",
    "in the living room",
)


def _pick(rng: np.random.Generator, words: tuple[str, ...]) -> str:
    return words[int(rng.integers(len(words)))]


def _noun_phrase(rng: np.random.Generator) -> str:
    if rng.random() < 0.15:
        return _pick(rng, _NAMES)
    adj = f"{_pick(rng, _ADJS)} " if rng.random() < 0.6 else ""
    return f"{_pick(rng, _DETS)} {adj}{_pick(rng, _NOUNS)}"


def sentence(rng: np.random.Generator) -> str:
    """One sentence of 5 to about 16 words from a small phrase-structure grammar."""
    form = int(rng.integers(5))
    subject = _noun_phrase(rng)
    if form == 0:
        text = f"{subject} {_pick(rng, _VERBS_T)} {_noun_phrase(rng)} {_pick(rng, _PREPS)} {_noun_phrase(rng)}"
    elif form == 1:
        text = f"{subject} {_pick(rng, _VERBS_I)} {_pick(rng, _PREPS)} {_noun_phrase(rng)} {_pick(rng, _TIMES)}"
    elif form == 2:
        text = f"{_pick(rng, _IMPERATIVES)} bring {_noun_phrase(rng)} to {_noun_phrase(rng)}"
    elif form == 3:
        text = (
            f"{subject} {_pick(rng, _VERBS_T)} {_noun_phrase(rng)} and {_pick(rng, _VERBS_I)} " f"{_pick(rng, _TIMES)}"
        )
    else:
        text = f"when {subject} {_pick(rng, _VERBS_I)} {_noun_phrase(rng)} {_pick(rng, _VERBS_T)} {_noun_phrase(rng)}"
    return text


def digit_string(rng: np.random.Generator) -> str:
    """Three to eight connected digits, with "oh" for zero a third of the time."""
    words = []
    for _ in range(int(rng.integers(3, 9))):
        d = _pick(rng, _DIGITS)
        words.append("oh" if d == "zero" and rng.random() < 0.33 else d)
    return " ".join(words)


def command(rng: np.random.Generator) -> str:
    """A short home-assistant command, sometimes with a place or a number of minutes."""
    text = f"{_pick(rng, _CMD_VERBS)} {_pick(rng, _CMD_OBJECTS)}"
    r = rng.random()
    if r < 0.4:
        text += f" {_pick(rng, _CMD_PLACES)}"
    elif r < 0.6:
        text += f" for {_pick(rng, _DIGITS[2:])} minutes"
    return text
