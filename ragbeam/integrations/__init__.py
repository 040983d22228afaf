"""Retrievers for LangChain (`ragbeam[langchain]`) and LlamaIndex (`ragbeam[llamaindex]`)."""
