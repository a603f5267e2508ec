"""The repository carries only text written for it: no third-party prose (prompts, docstrings) copied in.

VideoAlign's evaluation prompt is the one piece of third-party prose the package used to carry; it is now
read from the user's VideoAlign checkout (rewards/videoalign.py). This test keeps it out: it holds no
sentence of that prompt, only hashes of the first eight words of each of its sentences (normalised: lower
case, runs of letters and digits), and looks for any eight-word window of every text file that hashes the
same, whatever the line wrapping or quoting.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = 8
# sha256[:12] of "w1 ... w8" for each sentence of VideoAlign's detailed_special prompt (32 sentences)
VIDEOALIGN_SENTENCES = set(
    """01f2cb9fdd56 17031e791646 1b1c93684081 1f4008c5a7d8 37fe1b633ab3 394e7d33a1c4 3ca27334a1b7 3e1cb9b357da
    42219c8eeaa9 443bd003f31f 56283ae4f5a9 5d47e21f6ee0 5e7e0418bcfd 6d0e416fbe59 6edc3e834709 77f6d5e5fe26
    7b78f00795b7 84c6149d4c11 9998acb31bd7 99b55c28ce1e a002c11af981 a44a9693cbc5 a57f94cb44c9 ab65deb4eba0
    b4a6b59747c8 b6b25ed032cd d41f5ee6b5c4 e6fd36f463e4 e762268bdf0e eaf02ffe6318 efe450b9a444 f6cb2dfbf091""".split()
)
TEXT_SUFFIXES = {".py", ".md", ".txt", ".toml", ".yaml", ".yml", ".json", ".sh", ".cpp", ".cu", ".h", ".cfg", ".ini"}
SKIP_DIRS = {".git", "build", "__pycache__", "runs", ".pytest_cache", ".benchmarks"}


def _text_files(root: Path):
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if any(part in SKIP_DIRS or part.endswith(".egg-info") for part in rel.parts[:-1]):
            continue
        if path.is_file() and (path.suffix in TEXT_SUFFIXES or path.name in ("CMakeLists.txt", "setup.sh")):
            yield path


def _hash(words: list[str]) -> str:
    return hashlib.sha256(" ".join(words).encode()).hexdigest()[:12]


def copied_windows(text: str, hashes: set[str] = VIDEOALIGN_SENTENCES) -> int:
    """How many eight-word windows of `text` hash into `hashes`."""
    words = re.findall(r"[a-z0-9]+", text.lower())
    return sum(_hash(words[i : i + WORDS]) in hashes for i in range(len(words) - WORDS + 1))


def test_no_videoalign_prompt_text_in_the_repository():
    hits = {}
    for path in _text_files(ROOT):
        n = copied_windows(path.read_text(encoding="utf-8", errors="replace"))
        if n:
            hits[str(path.relative_to(ROOT))] = n
    assert not hits, f"sentences of VideoAlign's evaluation prompt found in {hits}; read it from the user's checkout"


def test_the_detector_finds_a_rewrapped_quoted_copy():
    sentence = "Rate the motion of the clip from zero to ten, ignoring its colours."
    hashes = {_hash(re.findall(r"[a-z0-9]+", sentence.lower())[:WORDS])}
    rewrapped = 'X = (\n    "rate the Motion of the\n"\n    "  clip from zero to ten, ignoring"\n)'
    assert copied_windows(rewrapped, hashes) == 1
    assert copied_windows("Rate the motion of a clip from zero to ten.", hashes) == 0
    assert len(VIDEOALIGN_SENTENCES) == 32 and all(re.fullmatch(r"[0-9a-f]{12}", h) for h in VIDEOALIGN_SENTENCES)
