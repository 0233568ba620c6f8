"""Saved-for-backward accounting, the learner bench's device-independent memory proxy: the
distinct storages autograd saves per micro-batch, by dtype and shape."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "int64",
                torch.int32: "int32", torch.bool: "bool", torch.uint8: "uint8"}


def tensor_label(t: torch.Tensor) -> str:
    """``bf16[8192x896]``: how a saved storage is named in the per-tensor accounting."""
    return f"{_DTYPE_NAMES.get(t.dtype, str(t.dtype))}[{'x'.join(map(str, t.shape))}]"


class SavedTensorProbe:
    """Bytes of the distinct storages autograd saves for backward, per micro-batch, and which
    tensors they are (label -> count and bytes; a storage is named by the first tensor saved
    from it).

    Within one forward every saved tensor is alive (the graph holds it), so storages are told
    apart by address. Parameters are excluded: they are held whatever the mode. The hooks
    return the tensor itself, so they change nothing about memory.
    """

    def __init__(self, model: torch.nn.Module):
        self.exclude = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.per_micro_batch: list[int] = []
        self.tensors: list[dict[str, dict[str, int]]] = []  # per micro-batch: label -> {count, bytes}

    @contextmanager
    def micro_batch(self) -> Iterator[None]:
        seen: dict[int, tuple[str, int]] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            try:
                storage = t.untyped_storage()
            except (RuntimeError, NotImplementedError):  # a tensor without plain storage
                return t
            ptr = storage.data_ptr()
            if ptr not in self.exclude and ptr not in seen:
                seen[ptr] = (tensor_label(t), storage.nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
        self.per_micro_batch.append(sum(nbytes for _, nbytes in seen.values()))
        tensors: dict[str, dict[str, int]] = {}
        for label, nbytes in seen.values():
            entry = tensors.setdefault(label, {"count": 0, "bytes": 0})
            entry["count"] += 1
            entry["bytes"] += nbytes
        self.tensors.append(tensors)


def extra_saved_tensors(mode: dict[str, dict[str, int]], plain: dict[str, dict[str, int]]) -> list[dict]:
    """What a mode saves for backward that plain does not (or fewer of), per tensor label,
    largest first: [{"tensor", "count", "bytes"}] with count and bytes as differences."""
    out = []
    for label in set(mode) | set(plain):
        a, b = mode.get(label, {"count": 0, "bytes": 0}), plain.get(label, {"count": 0, "bytes": 0})
        if a["count"] != b["count"] or a["bytes"] != b["bytes"]:
            out.append({"tensor": label, "count": a["count"] - b["count"], "bytes": a["bytes"] - b["bytes"]})
    return sorted(out, key=lambda e: (-abs(e["bytes"]), e["tensor"]))
