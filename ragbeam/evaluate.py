"""Recall@k of a corpus on hand-written questions (`ragbeam eval`).

A questions file is tab-separated with a header: id, file, question, answer_start,
answer_end, answer_text, kind (`../shared/corpus/questions.tsv` is one). A hit answers a
question when its object is that file (its URI ends with `/file`) and its byte range
overlaps [answer_start, answer_end). Recall@k is the share of questions with an answering
hit among the first k, per mode and per kind.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from typing import Optional, Sequence

from ragbeam.api import Corpus, Hit

MODES = ('hybrid', 'dense', 'lexical')


@dataclass(frozen=True)
class Question:
    id: str
    file: str
    text: str
    start: int
    end: int
    kind: str

    def answered_by(self, hit: Hit) -> bool:
        return ((hit.uri == self.file or hit.uri.endswith('/' + self.file))
                and hit.page is None and hit.start < self.end and self.start < hit.end)


def read_questions(path: str) -> list[Question]:
    with open(path, newline='', encoding='utf-8') as f:
        rows = list(csv.DictReader(f, delimiter='\t', quoting=csv.QUOTE_NONE))
    missing = {'id', 'file', 'question', 'answer_start', 'answer_end', 'kind'} - set(
        rows[0] if rows else ())
    if missing:
        raise ValueError(f'{path}: no column {", ".join(sorted(missing))} (expected: id, file, '
                         'question, answer_start, answer_end, answer_text, kind)')
    return [Question(r['id'], r['file'], r['question'], int(r['answer_start']),
                     int(r['answer_end']), r['kind']) for r in rows]


def evaluate(corpus: Corpus, questions: Sequence[Question], k: int = 10,
             modes: Sequence[str] = MODES) -> dict:
    """{k, questions, recall: {mode: {kind: r, 'all': r}}, ranks: {mode: {id: rank or None}}}:
    each question's rank of its first answering hit in each mode."""
    ranks: dict[str, dict[str, Optional[int]]] = {}
    for mode in modes:
        ranks[mode] = {}
        for q in questions:
            hits = corpus.search(q.text, k=k, mode=mode)
            ranks[mode][q.id] = next((n for n, h in enumerate(hits, 1) if q.answered_by(h)),
                                     None)
    kinds = sorted({q.kind for q in questions})
    recall = {mode: {kind: _recall([ranks[mode][q.id] for q in questions
                                    if kind in (q.kind, 'all')])
                     for kind in [*kinds, 'all']} for mode in modes}
    return {'k': k, 'questions': len(questions),
            'kinds': {kind: sum(q.kind == kind for q in questions) for kind in kinds},
            'recall': recall, 'ranks': ranks}


def _recall(ranks: list[Optional[int]]) -> Optional[float]:
    return round(sum(r is not None for r in ranks) / len(ranks), 4) if ranks else None


def table(result: dict) -> str:
    """recall@k per mode (rows) and kind (columns)."""
    kinds = [*result['kinds'], 'all']
    head = f"{'recall@' + str(result['k']):<10}" + ''.join(
        f"{kind + ' (' + str(result['kinds'].get(kind, result['questions'])) + ')':>18}"
        for kind in kinds)
    rows = [f'{mode:<10}' + ''.join(f'{by_kind[kind]:>18.3f}' for kind in kinds)
            for mode, by_kind in result['recall'].items()]
    return '\n'.join([head, *rows])
