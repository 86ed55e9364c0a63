"""Large tensors of a job's payload travel once, while they stay the same.

A sampling job's payload repeats most of itself from prompt to prompt: the conditioning
(FLUX's T5 context is 8 MiB) and a LoRA's weight patches (tens to hundreds of MiB) are the
same tensor objects as long as the user changes only the seed or the sampler. `TensorsSentOnce`
(in the controller) pickles a payload with each large CPU tensor replaced by a token; a
tensor the workers received with the last successful job is sent as its token alone, any
other is sent beside the body. `unpack` (in a worker) resolves the tokens from what the last
job left in its cache and keeps exactly this job's tensors for the next one.

Both sides hold the tensors of the last job of that kind and nothing else, so they agree
without further messages. The controller keeps its tensors alive: a token (the tensor's
identity, storage address, layout and a sample of its values) can then never be reused by
another tensor. It forgets everything when a job fails or the pool is replaced.
"""
from __future__ import annotations

import hashlib
import io
import pickle
from typing import Any, Callable

import torch

MIN_BYTES = 16 * 1024  # smaller tensors travel inline (a rank-4 LoRA matrix of FLUX is 24 KiB)
SAMPLED_VALUES = 16  # a sample of the values guards against in-place changes (inference tensors have no version)


def _token(tensor: torch.Tensor) -> str:
    from .transfer import _sample

    try:
        version = tensor._version
    except RuntimeError:  # an inference tensor: no version counter
        version = -1
    sample = _sample(tensor.detach(), SAMPLED_VALUES).contiguous().view(torch.uint8).numpy().tobytes()
    head = (f"{id(tensor)}|{tensor.data_ptr()}|{tuple(tensor.shape)}|{tuple(tensor.stride())}|"
            f"{tensor.storage_offset()}|{tensor.dtype}|{version}|").encode()
    return hashlib.sha1(head + sample).hexdigest()


def _travels_by_token(obj: Any) -> bool:
    return (type(obj) is torch.Tensor or type(obj) is torch.nn.Parameter) and obj.device.type == "cpu" \
        and obj.numel() * obj.element_size() >= MIN_BYTES


class _TokenPickler(pickle.Pickler):
    def __init__(self, file, tokens: Callable[[torch.Tensor], str], inline_ids: set):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self._tokens = tokens
        self._inline_ids = inline_ids

    def persistent_id(self, obj):
        if _travels_by_token(obj) and id(obj) not in self._inline_ids:
            return self._tokens(obj)
        return None


class _TokenUnpickler(pickle.Unpickler):
    def __init__(self, file, tensors: dict):
        super().__init__(file)
        self._tensors = tensors

    def persistent_load(self, token):
        return self._tensors[token]


class TensorsSentOnce:
    """Controller side, one per job kind (e.g. the sampling job)."""

    def __init__(self):
        self._pids: tuple = ()
        self._held: dict[str, torch.Tensor] = {}  # what the workers got with the last successful job
        self._pending: dict[str, torch.Tensor] = {}  # this job's tensors, held once it succeeds

    def pack(self, payload: dict, pids, inline: tuple = ()) -> dict:
        """The envelope to send instead of `payload` (a dict of bytes, tensors and tokens);
        pickling errors propagate. The tensors at `payload[key]` for `inline` keys always
        travel in the body: the job may change them in place (the latent being sampled).
        Call `confirm()` after the job succeeded, else `forget()`."""
        if tuple(pids) != self._pids:  # another pool: its workers hold nothing yet
            self._pids, self._held = tuple(pids), {}
        used: dict[str, torch.Tensor] = {}

        def token(tensor: torch.Tensor) -> str:
            key = _token(tensor)
            used[key] = tensor
            return key

        buffer = io.BytesIO()
        _TokenPickler(buffer, token, {id(payload[key]) for key in inline if key in payload}).dump(payload)
        self._pending = used
        return {"body": buffer.getvalue(), "held": [k for k in used if k in self._held],
                "new": {k: t for k, t in used.items() if k not in self._held}}

    def confirm(self) -> None:
        self._held, self._pending = self._pending, {}

    def forget(self) -> None:
        self._held, self._pending = {}, {}


def unpack(envelope: dict, cache: dict) -> Any:
    """Worker side: the payload of `envelope`; `cache` (this job kind's, kept between jobs)
    ends up holding exactly this job's tensors."""
    missing = [k for k in envelope["held"] if k not in cache]
    if missing:  # the controller's view and ours disagree: a bug, not a user error
        raise RuntimeError(f"{len(missing)} tensor(s) the controller believes this worker holds are not cached here")
    tensors = {**{k: cache[k] for k in envelope["held"]}, **envelope["new"]}
    payload = _TokenUnpickler(io.BytesIO(envelope["body"]), tensors).load()
    cache.clear()
    cache.update(tensors)
    return payload


def is_envelope(obj: Any) -> bool:
    return isinstance(obj, dict) and set(obj) == {"body", "held", "new"}
