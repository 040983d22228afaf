"""A LangChain retriever over a ragbeam corpus (`pip install 'ragbeam[langchain]'`).

    from ragbeam.integrations.langchain import RagbeamRetriever

    retriever = RagbeamRetriever(output='s3://corpus/docs', k=4)
    docs = retriever.invoke('how do I rotate the signing keys')
"""
from __future__ import annotations

from typing import Any, Optional

from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, PrivateAttr

import ragbeam
from ragbeam.integrations.metadata import hit_metadata


class RagbeamRetriever(BaseRetriever):
    """The k best chunks of a ragbeam corpus as Documents: the chunk's text, and where it
    comes from and how it ranked in the metadata. The corpus is opened once, on first use."""
    model_config = ConfigDict(arbitrary_types_allowed=True)

    output: str
    k: int = 4
    mode: str = 'hybrid'
    uri_prefix: Optional[str] = None
    _corpus: Optional[ragbeam.Corpus] = PrivateAttr(default=None)

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun,
                                **kwargs: Any) -> list[Document]:
        if self._corpus is None:
            self._corpus = ragbeam.open(self.output)
        hits = self._corpus.search(query, k=self.k, mode=self.mode, uri_prefix=self.uri_prefix)
        return [Document(page_content=hit.text, metadata=hit_metadata(hit)) for hit in hits]
