"""The lexical index's tokenizer: the same terms for a chunk and for a query, in any script.

- Text is NFKC-normalised (full-width Latin, ligatures, composed accents) and case-folded
  (`ß` -> `ss`, Cyrillic and Greek case).
- Scripts written with spaces (Latin with its accents, Cyrillic, Greek, Arabic, Hebrew,
  Devanagari and the other Indic scripts, Hangul): a term is a run of letters and digits
  with the combining marks inside it (Indic vowel signs, a decomposed accent), so a word is
  one term. Arabic harakat and Hebrew points, which most text leaves out, are dropped: a
  vowelled word and its plain spelling are the same term.
- Scripts written without spaces (Han, Hiragana, Katakana, Thai, Lao, Khmer, Myanmar):
  overlapping character bigrams of each run, and a run of one character as itself, the
  scheme of Lucene's CJK analyzer. A query span of such text shares its bigrams with the
  chunk it comes from wherever it is cut.
- No stemming and no stop words: known-item and exact-phrase lookups are what the lexical
  side is for, and BM25's idf already discounts common words.
- A term is at most MAX_TERM_CHARS characters (longer runs, such as hex dumps, are cut).
- `words` gives these terms; `pairs` each pair of neighbouring words (`net_migration`), which
  the lexical index keeps in a field of its own.
"""
from __future__ import annotations

import re
import unicodedata

TOKENIZER = 'ragbeam-terms-v1'   # named in index.json: a change means a rebuild
MAX_TERM_CHARS = 64

# written without spaces: Thai, Lao, Myanmar, Khmer, Hiragana/Katakana, CJK ideographs and
# their extensions, compatibility ideographs, half-width Katakana
_UNSPACED = ('\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u31f0-\u31ff\u3400-\u4dbf'
             '\u4e00-\u9fff\uf900-\ufaff\uff66-\uff9f\U00020000-\U0003134f')
# combining marks that sit inside words of spaced scripts (\w leaves them out)
_MARKS = ('\u0300-\u036f\u0483-\u0489\u0591-\u05c7\u0610-\u061a\u064b-\u065f\u0670'
          '\u06d6-\u06ed\u0711\u0730-\u074a\u0900-\u0dff\u1ab0-\u1aff\u1dc0-\u1dff'
          '\u20d0-\u20ff\ufe20-\ufe2f')
_OPTIONAL_VOWELS = dict.fromkeys([*range(0x064b, 0x0660), 0x0670, *range(0x0591, 0x05be),
                                  0x05bf, 0x05c1, 0x05c2, 0x05c4, 0x05c5, 0x05c7])
_TERMS = re.compile(f'[{_UNSPACED}]+|(?:[^\\W_{_UNSPACED}]|[{_MARKS}])+')
_UNSPACED_RUN = re.compile(f'[{_UNSPACED}]')
_ASCII_TERMS = re.compile('[a-z0-9]+')  # what _TERMS finds in ASCII text, faster


def terms(text: str) -> list[str]:
    """The terms of `text`: its words, then each pair of neighbouring words joined by `_`
    (repeats kept: BM25 counts them)."""
    found = words(text)
    return found + pairs(found)


def pairs(found: list[str]) -> list[str]:
    """Each pair of neighbouring words, joined by `_` (which no word holds)."""
    return [f'{a}_{b}' for a, b in zip(found, found[1:])]


def words(text: str) -> list[str]:
    """The words of `text`, in order: runs of letters, digits and marks, and bigrams of the
    scripts written without spaces."""
    if text.isascii():
        found = _ASCII_TERMS.findall(text.lower())
        if not found or max(map(len, found)) <= MAX_TERM_CHARS:
            return found
        return [word[:MAX_TERM_CHARS] for word in found]
    found = _TERMS.findall(unicodedata.normalize('NFKC', text).casefold()
                           .translate(_OPTIONAL_VOWELS))
    out = []
    for word in found:
        if len(word) > MAX_TERM_CHARS:
            out.append(word[:MAX_TERM_CHARS])
        elif word[0] < '\u0e00' or not _UNSPACED_RUN.match(word) or len(word) == 1:
            out.append(word)
        else:
            out.extend(word[i:i + 2] for i in range(len(word) - 1))
    return out
