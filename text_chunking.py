"""Voice-clone text chunking (docs/model.md): normalise the text, then cut it into chunks within a token budget.

A text that fits the budget is returned as it is (stripped), like upstream. Otherwise chunks are spans of the
normalised text. Cutting only ever happens at a position of the normalised text, and a
single space at a cut is dropped; nothing is inserted, reordered or repeated. So for the normalised text N and the
chunks c0..ck:

    N == c0 + s0 + c1 + s1 + ... + ck      with every separator s_i either "" or " "

where s_i is " " exactly when N has a space at that cut (no text lost or duplicated, and no space is ever
inserted, e.g. between CJK chunks). Every chunk satisfies
`count_tokens(chunk) <= max_tokens`, except a chunk made of one code point that alone exceeds the budget.

How cuts are chosen (upstream's scheme, made exact): cut positions come in levels, coarse to fine: sentence ends
(after `.!?;。！？；…` runs plus the closing quotes/brackets that follow), clause marks (`,，、：:`), word boundaries
(spaces, and the edges of Han/kana characters, which are written without spaces), grapheme-cluster boundaries, and
code points. A level's cuts are used only inside a span of the coarser level that exceeds the budget (a sentence
is cut at its clauses only when it is too long, and so on); then, from the start, each chunk runs to the furthest
usable cut that keeps it within budget (upstream's greedy merge of neighbours). Every level but the last skips
cuts that would start a chunk with closing punctuation ("," "。" ")" ...), so that happens only when a run with no
other cut exceeds the budget by itself.
"""

from __future__ import annotations

import bisect
import re
import unicodedata
from typing import Callable

SENTENCE_END = frozenset(".!?;。！？；…‼⁇⁈⁉।॥؟۔")
CLAUSE_MARKS = frozenset(",，、：:﹐﹑،")
CLOSERS = frozenset("\"'”’»)]}）］｝」』】〕〗〉》›")
# ASCII marks also occur inside tokens ("3.14", "1,000", "12:30", "e.g"): they only cut before a space, the end,
# or a CJK character.
_ASCII_MARKS = frozenset(".!?;,:")
_MARKS = SENTENCE_END | CLAUSE_MARKS
# Besides the marks above and closing brackets / final quotes (Unicode Pe, Pf), these never start a chunk when
# another cut is possible. ASCII quotes are ambiguous (they also open a quotation), so they may.
_NO_LEADING = frozenset("%‰‱·・‥、")
_ZERO_WIDTH_JOINER = "\u200d"

SHORT_CHUNK_WORDS = 4
PAUSE_AFTER_SHORT_CHUNK = 0.40
PAUSE_AFTER_CHUNK = 0.24

_WHITESPACE = re.compile(r"\s+")

# Scripts written without spaces between words (Han, kana, Bopomofo). Hangul is left out on purpose: Korean
# separates words with spaces, so it is chunked (and normalised) like alphabetic text.
_CJK_RANGES = (
    (0x2E80, 0x2FDF),  # CJK radicals, Kangxi radicals
    (0x3005, 0x3007),  # ideographic iteration mark, closing mark, number zero
    (0x3040, 0x30FF),  # Hiragana, Katakana
    (0x3100, 0x312F),  # Bopomofo
    (0x31A0, 0x31FF),  # Bopomofo extended, CJK strokes, Katakana phonetic extensions
    (0x3400, 0x4DBF),  # CJK extension A
    (0x4E00, 0x9FFF),  # CJK unified ideographs
    (0xF900, 0xFAFF),  # CJK compatibility ideographs
    (0xFF66, 0xFF9F),  # half-width Katakana
    (0x20000, 0x3134F),  # CJK extensions B..G
)


def is_cjk_char(char: str) -> bool:
    """Whether `char` (one code point) is a Han ideograph, kana or Bopomofo character."""
    code = ord(char)
    return any(low <= code <= high for low, high in _CJK_RANGES)


def _is_cjk_text(text: str) -> bool:
    # Mixed text counts as CJK when its CJK characters outnumber its other words (runs of other letters): Chinese
    # with an English brand name is CJK, an English sentence that quotes one Chinese name is not.
    cjk = sum(1 for char in text if is_cjk_char(char))
    other_words = len(re.findall(r"[^\W\d_]+", "".join(" " if is_cjk_char(char) else char for char in text)))
    return cjk > other_words


def _ends_sentence(text: str) -> bool:
    stripped = text.rstrip("".join(CLOSERS))
    return bool(stripped) and stripped[-1] in SENTENCE_END


def normalize_text(text: str) -> str:
    """Normalise text before chunking (upstream's rules, docs/model.md, Long text).

    Control characters are removed, whitespace runs become one space, the ends are stripped. CJK text gets a final
    "。" when it does not end a sentence; other text gets a capital first letter and a final "." when it ends with a
    letter or digit. Upstream also prepends 8 spaces to texts of fewer than 5 words; that is left out on purpose:
    the released SentencePiece normaliser strips leading spaces, so they never reach the model, and keeping them
    would only put invisible characters into the chunks.

    Args:
        text: the text to speak.

    Returns:
        The normalised text (never empty).

    Raises:
        ValueError: when `text` is not a string, or is empty, whitespace-only or control-characters-only.
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    kept = "".join(char for char in text if char.isspace() or unicodedata.category(char) not in ("Cc", "Cs"))
    folded = _WHITESPACE.sub(" ", kept).strip()
    if not folded:
        raise ValueError(
            f"text={text[:40]!r} has nothing to speak: it is empty, whitespace-only or control-characters-only"
        )
    if _is_cjk_text(folded):
        return folded if _ends_sentence(folded) else folded + "。"
    first = folded[0].upper()
    if len(first) == 1:
        folded = first + folded[1:]
    if folded[-1].isalnum():
        folded += "."
    return folded


def pause_seconds_after(chunk: str) -> float:
    """Silence inserted after a voice-clone chunk: 0.40 s after at most 4 whitespace-separated words, else 0.24 s.

    CJK text without spaces counts as one word, as upstream does.

    Args:
        chunk: a chunk returned by `split_text_into_chunks`.

    Returns:
        The pause in seconds.

    Raises:
        ValueError: when `chunk` is not a string.
    """
    if not isinstance(chunk, str):
        raise ValueError(f"chunk must be a string, got {type(chunk).__name__}")
    return PAUSE_AFTER_SHORT_CHUNK if len(chunk.split()) <= SHORT_CHUNK_WORDS else PAUSE_AFTER_CHUNK


def split_text_into_chunks(text: str, count_tokens: Callable[[str], int], max_tokens: int) -> list[str]:
    """Normalise `text` and cut it into chunks of at most `max_tokens` tokens.

    Args:
        text: the text to speak.
        count_tokens: the number of tokens of a string (e.g. `len(tok.encode(s, add_special_tokens=False))`).
        max_tokens: the budget per chunk (>= 1).

    Returns:
        The chunks in order. When the normalised text fits in one chunk, `[text.strip()]`: upstream (docs/model.md)
        speaks the original text then, so short inputs get the same prompt tokens as upstream; only when the
        original text alone exceeds the budget (a whitespace or control-character run) is the normalised one used.
        See the module docstring for the exact no-loss guarantee of several chunks and the one exception to the
        budget (a single code point over budget).

    Raises:
        ValueError: for an empty text (see `normalize_text`), a non-callable `count_tokens`, or `max_tokens` < 1.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens!r} must be an integer >= 1")
    if not callable(count_tokens):
        raise ValueError(f"count_tokens={count_tokens!r} must be a callable str -> int")
    chunks = _Chunker(normalize_text(text), count_tokens, max_tokens).run()
    if len(chunks) == 1 and count_tokens(text.strip()) <= max_tokens:
        return [text.strip()]
    return chunks


def chunk_separators(text: str, chunks: list[str]) -> list[str]:
    """The separator before each chunk of `split_text_into_chunks(text, ...)`: " " where the normalised text has a
    space at the cut, "" at the first chunk and where it has none (between CJK characters, inside a long word).

    Joining `separators[i] + chunks[i]` rebuilds the normalised text (for one chunk: the chunk itself).
    """
    if len(chunks) <= 1:
        return [""] * len(chunks)
    normalized, position, separators = normalize_text(text), 0, []
    for index, chunk in enumerate(chunks):
        separator = " " if index and normalized.startswith(" ", position) else ""
        separators.append(separator)
        position += len(separator) + len(chunk)
    return separators


class _Chunker:
    """Greedy cutter over the normalised text (single spaces only, no leading/trailing space)."""

    def __init__(self, text: str, count_tokens: Callable[[str], int], max_tokens: int) -> None:
        self.text = text
        self.count_tokens = count_tokens
        self.max_tokens = max_tokens

    def fits(self, start: int, end: int) -> bool:
        return self.count_tokens(self.text[start:end].strip(" ")) <= self.max_tokens

    def run(self) -> list[str]:
        cuts = self.active_cuts()
        chunks = []
        start = 0
        while start < len(self.text):
            end = self.next_cut(cuts, start)
            chunks.append(self.text[start:end].rstrip(" "))
            start = end + 1 if end < len(self.text) and self.text[end] == " " else end
        return chunks

    def active_cuts(self) -> list[int]:
        """Cut positions in use, coarse to fine: a level's cuts are used only inside spans of the coarser level
        that exceed the budget (a sentence is split at clause marks only when it is too long, and so on)."""
        active: list[int] = []
        over_budget = [] if self.fits(0, len(self.text)) else [(0, len(self.text))]
        for positions in _cut_levels(self.text):
            still_over = []
            for start, end in over_budget:
                inner = positions[bisect.bisect_right(positions, start) : bisect.bisect_left(positions, end)]
                if not inner:
                    still_over.append((start, end))
                    continue
                active.extend(inner)
                bounds = [start, *inner, end]
                # A single code point cannot be cut further: no need to count it.
                for low, high in zip(bounds[:-1], bounds[1:]):
                    if high - low > 1 and not self.fits(low, high):
                        still_over.append((low, high))
            over_budget = still_over
        return sorted(active)

    def next_cut(self, cuts: list[int], start: int) -> int:
        """The furthest active cut (or the end) whose chunk from `start` fits, found by galloping + bisection.

        The next active cut always fits (every finest span fits) unless it ends a lone code point over budget,
        which then becomes a chunk by itself. A non-monotonic `count_tokens` only makes the result shorter: every
        returned cut beyond the first is verified.
        """
        first = bisect.bisect_right(cuts, start)
        last = len(cuts) - first  # candidate k is cuts[first + k]; candidate `last` is the end of the text

        def candidate(k: int) -> int:
            return cuts[first + k] if k < last else len(self.text)

        good, probe = 0, 1
        while probe <= last and self.fits(start, candidate(probe)):
            good, probe = probe, probe * 2
        bad = min(probe, last + 1)
        if bad == last + 1 and good < last:
            if self.fits(start, candidate(last)):
                return candidate(last)
            bad = last
        while bad - good > 1:
            middle = (good + bad) // 2
            if self.fits(start, candidate(middle)):
                good = middle
            else:
                bad = middle
        return candidate(good)


def _strands_punctuation(text: str, cut: int) -> bool:
    following = cut + 1 if cut < len(text) and text[cut] == " " else cut
    if following >= len(text):
        return False
    char = text[following]
    return char in _MARKS or char in _NO_LEADING or unicodedata.category(char) in ("Pe", "Pf")


def _cut_levels(text: str) -> list[list[int]]:
    """Sorted cut positions per level: sentence ends, clause marks, word boundaries, grapheme clusters, code points.

    All levels but the last skip cuts that would start a chunk with closing punctuation; the code-point level
    (used only inside a cluster or a run that alone exceeds the budget) takes every position.
    """
    sentence, clause = _punctuation_cuts(text)
    word = [index for index in range(1, len(text)) if _is_word_boundary(text, index)]
    cluster = [index for index in range(1, len(text)) if not _extends_cluster(text, index)]
    levels = [
        [cut for cut in level if not _strands_punctuation(text, cut)] for level in (sentence, clause, word, cluster)
    ]
    levels.append(list(range(1, len(text))))
    return levels


def _punctuation_cuts(text: str) -> tuple[list[int], list[int]]:
    """Cuts after each run of sentence-end / clause marks plus the closing quotes and brackets that follow it."""
    sentence, clause = [], []
    length = len(text)
    index = 0
    while index < length:
        if text[index] not in _MARKS:
            index += 1
            continue
        run_start = index
        while index < length and text[index] in _MARKS:
            index += 1
        run = text[run_start:index]
        cut = index
        while cut < length and text[cut] in CLOSERS:
            cut += 1
        if cut >= length:
            break
        if run[-1] in _ASCII_MARKS and not (text[cut] == " " or is_cjk_char(text[cut])):
            continue  # "3.14", "1,000", "12:30", "e.g"
        (sentence if any(char in SENTENCE_END for char in run) else clause).append(cut)
    return sentence, clause


def _is_word_boundary(text: str, index: int) -> bool:
    if text[index] == " ":
        return True
    if text[index - 1] == " ":
        return False  # the cut sits on the space before, never after it
    return (is_cjk_char(text[index - 1]) or is_cjk_char(text[index])) and not _extends_cluster(text, index)


def _extends_cluster(text: str, index: int) -> bool:
    """Whether the code point at `index` belongs to the grapheme cluster before it (approximation)."""
    char = text[index]
    if text[index - 1] == _ZERO_WIDTH_JOINER or char == _ZERO_WIDTH_JOINER:
        return True
    if unicodedata.category(char) in ("Mn", "Mc", "Me"):
        return True
    code = ord(char)
    return 0xFE00 <= code <= 0xFE0F or 0x1F3FB <= code <= 0x1F3FF or 0xE0020 <= code <= 0xE007F
