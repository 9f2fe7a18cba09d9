"""Search queries embedded by ONNX Runtime: the same vectors as PyTorch, in a third of the time.

One short query through sentence-transformers and PyTorch took 12.6 ms on this project's
2-core machine, and 4.3 ms through ONNX Runtime (docs/benchmarks.md, ONNX table): most of a
search's latency. Documents stay on PyTorch, which embeds batches faster (ONNX fp32 made
0.89x the chunks per second).

The transformer is exported once per model to ``var/onnx/`` (a few seconds, at warm-up)
and checked against PyTorch on probe sentences: a model whose ONNX vectors differ, or
whose pooling is not the mean of its tokens, keeps PyTorch for queries too.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from django.conf import settings

logger = logging.getLogger(__name__)

_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Vectors are unit length: this is far below any difference that changes a ranking, and far
# above float32 noise between two runtimes (measured: 1.5e-8 to 2e-7).
_TOLERANCE = 1e-4
_PROBES = ["How do I install it?", "Stop words, numbers (42) and code: `x = y + 1`.", "Ça marche également."]


class OnnxQueryEncoder:
    """Mean-pooled, normalised sentence vectors of a sentence-transformers model, by ONNX Runtime."""

    def __init__(self, path: Path, tokenizer: Any, max_length: int) -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = os.cpu_count() or 1
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        # A copy of its own: a fast tokenizer keeps its padding and truncation settings on
        # itself, so sharing one with the document path would need its lock (documents take
        # seconds a batch, and a query would wait for them).
        self.tokenizer = copy.deepcopy(tokenizer)
        self._tokenizer_lock = threading.Lock()
        self.max_length = max_length

    def encode(self, texts: list[str]) -> np.ndarray:
        with self._tokenizer_lock:
            batch = self.tokenizer(
                texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="np"
            )
        ids = batch["input_ids"].astype(np.int64)
        feed = {
            "input_ids": ids,
            "attention_mask": batch["attention_mask"].astype(np.int64),
            "token_type_ids": batch["token_type_ids"].astype(np.int64)
            if "token_type_ids" in batch
            else np.zeros_like(ids),
        }
        [hidden] = self.session.run(None, feed)
        mask = feed["attention_mask"][..., None].astype(np.float32)
        pooled = (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
        return pooled / np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)


def load(model: Any, name: str, *, lock: threading.Lock) -> OnnxQueryEncoder | None:
    """An ONNX encoder giving the vectors ``model`` (a SentenceTransformer) gives, or None
    (with the reason logged) when it cannot: then queries stay on PyTorch."""
    if not settings.RAG_ONNX_QUERIES:
        return None
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        logger.warning("onnxruntime is not installed: search queries are embedded by PyTorch (slower)")
        return None
    reason = _unsupported(model)
    if reason:
        logger.info("Search queries of %s stay on PyTorch: %s", name, reason)
        return None
    try:
        with lock:  # the PyTorch model's tokenizer is not safe to share between threads
            path = _exported(model, name)
            encoder = OnnxQueryEncoder(path, model.tokenizer, model.get_max_seq_length() or 512)
            expected = model.encode(_PROBES, normalize_embeddings=True, convert_to_numpy=True)
            difference = float(np.abs(encoder.encode(_PROBES) - expected).max())
    except Exception:
        logger.exception("Exporting %s to ONNX failed: search queries are embedded by PyTorch", name)
        return None
    if difference > _TOLERANCE:
        logger.warning("ONNX vectors of %s differ from PyTorch's by %.2g: queries stay on PyTorch", name, difference)
        return None
    logger.info("Search queries of %s are embedded by ONNX Runtime (%s)", name, path.name)
    return encoder


def _unsupported(model: Any) -> str:
    """Why this model's queries cannot go through the exported transformer, or ''."""
    modules = [type(module).__name__ for module in model]
    if modules[:2] != ["Transformer", "Pooling"] or any(m != "Normalize" for m in modules[2:]):
        return f"its modules are {modules}, not Transformer, Pooling (and Normalize)"
    pooling = model[1]
    # sentence-transformers 6 names it pooling_mode; earlier releases had a getter.
    mode = getattr(pooling, "pooling_mode", None) or pooling.get_pooling_mode_str()
    if mode != "mean":
        return f"it pools by {mode}, not by the mean"
    if len(modules) == 2:
        return "its vectors are not normalised"
    return ""


def _exported(model: Any, name: str) -> Path:
    """The model's transformer as ONNX, exported on first use and kept in var/onnx/."""
    folder = Path(settings.RAG_ONNX_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    # A new export when the weights change (a reembed to another folder, an upgrade).
    digest = hashlib.sha256(
        b"".join(p.detach().numpy().tobytes()[:4096] for p in model[0].auto_model.parameters())
    ).hexdigest()[:16]
    path = folder / f"{Path(name).name}-{digest}.onnx"
    if path.exists():
        return path
    # Written beside, then renamed: another process exporting at the same time (the web
    # processes and the worker warm up together) never reads half a file.
    partial = path.with_suffix(f".{os.getpid()}.partial")
    logger.info("Exporting %s to ONNX for search queries (once)", name)
    export(model, partial)
    partial.replace(path)
    return path


def export(model: Any, path: Path) -> None:
    """Write ``model``'s transformer (a SentenceTransformer's first module) to ``path`` as
    ONNX, with batch and sequence dimensions left free; pooling stays outside, in numpy."""
    import torch

    transformer = model[0].auto_model.eval()

    class Encoder(torch.nn.Module):
        # Inputs by name: the transformer's positional order changed between transformers releases.
        def __init__(self) -> None:
            super().__init__()
            self.transformer = transformer

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any) -> Any:
            return self.transformer(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state

    tokens = model.tokenizer(["an example sentence"], return_tensors="pt")
    if "token_type_ids" not in tokens:
        tokens["token_type_ids"] = torch.zeros_like(tokens["input_ids"])
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about Python branches on shapes; the probes check the result.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Encoder(),
            tuple(tokens[k] for k in _INPUTS),
            str(path),
            input_names=list(_INPUTS),
            output_names=["last_hidden_state"],
            dynamic_axes={k: {0: "batch", 1: "sequence"} for k in _INPUTS},
            opset_version=17,
            dynamo=False,
        )
