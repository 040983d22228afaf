"""ragbeam's public Python API: run the pipeline, open a corpus, search it.

    import ragbeam

    report = ragbeam.run(['s3://docs/**'], 's3://corpus/docs', chunk_size=800)
    corpus = ragbeam.open('s3://corpus/docs')
    for hit in corpus.search('how do I rotate the signing keys', k=5):
        print(hit.score, hit.uri, hit.page, hit.text[:80])

Framework retrievers: `ragbeam.integrations.langchain` and `ragbeam.integrations.llama_index`
(extras `langchain` and `llamaindex`).
"""
from ragbeam.api import Corpus, Hit, Report, open, run

__all__ = ['Corpus', 'Hit', 'Report', 'open', 'run']
