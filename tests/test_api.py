"""The public Python API (`import ragbeam`) and the LangChain and LlamaIndex retrievers."""
from __future__ import annotations

import json
import shutil
import sys
import threading

import pytest

import ragbeam
from tests.conftest import CORPUS, ROOT, check_output, ragbeam as ragbeam_command

FILES = ['rfc3986.txt', 'pep-0008.rst', 'alice29-crlf.txt']


@pytest.fixture(scope='module')
def corpus(text_run):
    return ragbeam.open(str(text_run))


def _probes(corpus, n: int = 6) -> list[tuple[str, str]]:
    """(12 words from the middle of a chunk, its chunk_id) for `n` chunks spread through the
    table: known-item queries."""
    rows = corpus.chunks().to_table(columns=['chunk_id', 'text']).to_pylist()
    probes = []
    for row in rows[::max(1, len(rows) // 40)]:
        words = row['text'].split()
        if len(words) >= 60 and len(set(words)) > 40:
            middle = len(words) // 2
            probes.append((' '.join(words[middle - 6:middle + 6]), row['chunk_id']))
    return probes[:n]


@pytest.mark.parametrize('mode', ['hybrid', 'dense', 'lexical'])
def test_search_gives_the_hits_of_ragbeam_query(corpus, text_run, mode):
    for text in ('percent-encoding of reserved characters', 'the queen was in a furious passion'):
        hits = corpus.search(text, k=5, mode=mode)
        cli = json.loads(ragbeam_command('query', '--output', text_run, '--json', '-k', '5',
                                         '--mode', mode, text).stdout)
        assert [(h.chunk_id, h.uri, h.page, h.start, h.end, h.text, h.score) for h in hits] == [
            (r['chunk_id'], r['uri'], r['page'], r['start'], r['end'], r['text'], r['score'])
            for r in cli]
        assert [(h.dense_rank, h.lexical_rank) for h in hits] == [
            (r.get('dense_rank'), r.get('lexical_rank')) for r in cli]
    prefix = str(CORPUS / 'text' / 'pep-0008.rst')
    assert {h.uri for h in corpus.search('line length', k=5, mode=mode, uri_prefix=prefix)} == {
        prefix}


def test_a_corpus_reports_its_version_history_and_tables(corpus):
    report = corpus.report()
    assert report.table_version == corpus.version == 0
    assert report.chunks == corpus.chunks().count_rows() > 2000
    assert corpus.manifest().count_rows() == report.objects_listed == 22
    history, = corpus.history()
    assert history['version'] == 0 and history['objects_new'] == 22
    with pytest.raises(ValueError):
        corpus.search('anything', k=0)


def test_run_then_refresh_switches_versions_while_a_running_search_keeps_its_own(tmp_path):
    src, out = tmp_path / 'src', tmp_path / 'out'
    src.mkdir()
    for name in FILES[:2]:
        shutil.copy2(CORPUS / 'text' / name, src / name)
    first = ragbeam.run(str(src), str(out), embedder='hash', chunk_size=800)
    assert (first.table_version, first.objects_ok) == (0, 2)
    corpus = ragbeam.open(str(out))
    before = {r['chunk_id'] for r in corpus.chunks().to_table(['chunk_id']).to_pylist()}
    assert not corpus.refresh()  # nothing newer

    # a search that is embedding its query when the refresh happens
    started, release, found = threading.Event(), threading.Event(), {}
    embedder = corpus._current.embedder
    embed = embedder.embed_queries

    def slow(texts):
        started.set()
        release.wait(60)
        return embed(texts)

    embedder.embed_queries = slow
    searching = threading.Thread(target=lambda: found.update(
        hits=corpus.search('the queen was in a furious passion', k=5)))
    searching.start()
    assert started.wait(60)
    shutil.copy2(CORPUS / 'text' / FILES[2], src / FILES[2])  # alice: queens and passions
    second = ragbeam.run([str(src)], str(out), embedder='hash', chunk_size=800)
    assert second.table_version == 1
    assert corpus.refresh() and corpus.version == 1
    release.set()
    searching.join(60)
    assert found['hits'] and {h.chunk_id for h in found['hits']} <= before  # the old version
    hits = corpus.search('the queen was in a furious passion', k=5)
    assert hits[0].uri.endswith(FILES[2])  # the new version, without a restart
    check_output(out, '--input', src, '--chunk-size', '800')


def test_python_dash_m_ragbeam_is_the_ragbeam_command(text_run):
    import subprocess

    def history(module):
        return subprocess.run([sys.executable, '-m', module, 'history', '--output',
                               str(text_run), '--json'], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout

    assert json.loads(history('ragbeam')) == json.loads(history('pipeline'))


def test_the_langchain_retriever_finds_known_items_with_their_metadata(corpus, text_run):
    from langchain_core.documents import Document

    from ragbeam.integrations.langchain import RagbeamRetriever

    retriever = RagbeamRetriever(output=str(text_run), k=4)
    probes = _probes(corpus)
    assert len(probes) >= 5
    for text, chunk_id in probes:
        docs = retriever.invoke(text)
        assert len(docs) == 4 and all(isinstance(d, Document) for d in docs)
        top = docs[0].metadata
        assert top['chunk_id'] == chunk_id and text.split()[0] in docs[0].page_content
        assert top['uri'].startswith(str(CORPUS / 'text')) and top['end'] > top['start'] >= 0
        assert top['score'] >= docs[1].metadata['score'] and top['dense_rank'] >= 1


def test_the_llama_index_retriever_finds_known_items_with_their_metadata(corpus, text_run):
    from llama_index.core.schema import NodeWithScore

    from ragbeam.integrations.llama_index import RagbeamRetriever

    retriever = RagbeamRetriever(output=str(text_run), k=4, mode='lexical')
    for text, chunk_id in _probes(corpus):
        nodes = retriever.retrieve(text)
        assert len(nodes) == 4 and all(isinstance(n, NodeWithScore) for n in nodes)
        top = nodes[0]
        assert top.node.node_id == chunk_id == top.node.metadata['chunk_id']
        assert top.score == top.node.metadata['score'] >= nodes[1].score
        assert top.node.metadata['lexical_rank'] == 1 and top.node.metadata['dense_rank'] is None


def test_eval_prints_recall_per_mode_and_kind_and_its_json_is_a_recount_of_the_hits(corpus,
                                                                                   text_run):
    import csv

    questions_file = CORPUS / 'questions.tsv'
    proc = ragbeam_command('eval', '--output', text_run, '--questions', questions_file, '--json')
    found = json.loads(proc.stdout)
    with open(questions_file, newline='', encoding='utf-8') as f:
        questions = list(csv.DictReader(f, delimiter='\t', quoting=csv.QUOTE_NONE))
    assert found['questions'] == len(questions) == 60
    assert found['kinds'] == {'keyword': 20, 'paraphrase': 40}
    for mode in ('hybrid', 'dense', 'lexical'):
        answered = {}
        for q in questions:  # the rule of the corpus's README: same file, bytes overlap
            hits = corpus.search(q['question'], k=10, mode=mode)
            answered[q['id']] = any(
                h.uri == str(CORPUS / q['file']) and h.start < int(q['answer_end'])
                and int(q['answer_start']) < h.end for h in hits)
        assert {i for i, rank in found['ranks'][mode].items() if rank} == {
            i for i, ok in answered.items() if ok}
        for kind in ('keyword', 'paraphrase'):
            of_kind = [q['id'] for q in questions if q['kind'] == kind]
            assert found['recall'][mode][kind] == round(
                sum(answered[i] for i in of_kind) / len(of_kind), 4)
    assert 0 < found['recall']['lexical']['all'] <= 1  # not vacuous: BM25 answers some
    table = ragbeam_command('eval', '--output', text_run, '--questions', questions_file).stdout
    assert table.splitlines()[0].split()[:3] == ['recall@10', 'keyword', '(20)']
    assert [line.split()[0] for line in table.splitlines()[1:]] == ['hybrid', 'dense', 'lexical']
