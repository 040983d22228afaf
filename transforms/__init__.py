"""Beam transforms of ragbeam: listing, reading, chunking, embedding, writing, indexing."""
