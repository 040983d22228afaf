"""A LlamaIndex retriever over a ragbeam corpus (`pip install 'ragbeam[llamaindex]'`).

    from ragbeam.integrations.llama_index import RagbeamRetriever

    retriever = RagbeamRetriever(output='s3://corpus/docs', k=4)
    nodes = retriever.retrieve('how do I rotate the signing keys')
"""
from __future__ import annotations

from typing import Optional

from llama_index.core.retrievers import BaseRetriever
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode

import ragbeam
from ragbeam.integrations.metadata import hit_metadata


class RagbeamRetriever(BaseRetriever):
    """The k best chunks of a ragbeam corpus as scored TextNodes (the node's id is the
    chunk's id; where it comes from and how it ranked in the metadata). The corpus is
    opened once, on first use."""

    def __init__(self, output: str, k: int = 4, mode: str = 'hybrid',
                 uri_prefix: Optional[str] = None, **kwargs):
        super().__init__(**kwargs)
        self.output, self.k, self.mode, self.uri_prefix = output, k, mode, uri_prefix
        self._corpus: Optional[ragbeam.Corpus] = None

    def _retrieve(self, query_bundle: QueryBundle) -> list[NodeWithScore]:
        if self._corpus is None:
            self._corpus = ragbeam.open(self.output)
        hits = self._corpus.search(query_bundle.query_str, k=self.k, mode=self.mode,
                                   uri_prefix=self.uri_prefix)
        return [NodeWithScore(node=TextNode(id_=hit.chunk_id, text=hit.text,
                                            metadata=hit_metadata(hit)), score=hit.score)
                for hit in hits]
