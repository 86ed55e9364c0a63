"""Large tensors of a job's payload travel once, while they stay the same.

A sampling job's payload repeats most of itself from prompt to prompt: the conditioning
(FLUX's T5 context is 8 MiB) and a LoRA's weight patches (tens to hundreds of MiB) are the
same tensor objects as long as the user changes only the seed or the sampler. `TensorsSentOnce`
(in the controller) pickles a payload with each large CPU tensor replaced by a token; a
tensor the workers received with the last successful job is sent as its token alone, any
other is sent beside the body. `unpack` (in a worker) resolves the tokens from what the last
job left in its cache and keeps exactly this job's tensors for the next one.

Both sides hold the tensors of the last job of that kind and nothing else, so they agree
without further messages. The controller holds its tensors weakly: one the graph lets go of
(a LoRA or ControlNet no longer used, hundreds of MiB) is freed as usual, and its token leaves
the held set as it dies, before its identity or storage address can be reused, so a token (the
tensor's identity, storage address, layout and a sample of its values) can never name another
tensor; the workers' copy goes with their next job. The controller forgets everything when a
job fails, when the job wrote into a tensor it received (each worker checks the version
counters after the job), or when the pool is replaced; a job and `forget()` (ComfyUI unloading
its models) never interleave.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import pickle
import threading
import weakref
from typing import Any, Callable, Iterator

import torch

from ..refs import Pickler

MIN_BYTES = 16 * 1024  # smaller tensors travel inline (a rank-4 LoRA matrix of FLUX is 24 KiB)
SAMPLED_VALUES = 256  # a sample of the values guards against in-place changes (inference tensors have no version)


def _version(tensor: torch.Tensor) -> int:
    try:
        return tensor._version
    except RuntimeError:  # an inference tensor: no version counter
        return -1


def tensor_token(tensor: torch.Tensor) -> str:
    """Names this tensor object with these values: identity, layout, version and a sample."""
    from .transfer import _sample

    version = _version(tensor)
    # .cpu(): ControlNet weights live on the GPU under --highvram / --gpu-only
    sample = _sample(tensor.detach(), SAMPLED_VALUES).contiguous().view(torch.uint8).cpu().numpy().tobytes()
    head = (f"{id(tensor)}|{tensor.data_ptr()}|{tuple(tensor.shape)}|{tuple(tensor.stride())}|"
            f"{tensor.storage_offset()}|{tensor.dtype}|{version}|").encode()
    return hashlib.sha1(head + sample).hexdigest()


def _travels_by_token(obj: Any) -> bool:
    return (type(obj) is torch.Tensor or type(obj) is torch.nn.Parameter) and obj.device.type == "cpu" \
        and obj.layout == torch.strided and obj.numel() * obj.element_size() >= MIN_BYTES


class _TokenPickler(Pickler):  # a custom node pack's sampler travels by file (refs.dumps)
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
        # A new tensor object on the cached storage: the job cannot rebind the cached object
        # (`.data = ...`, a module's `.to()`), and in-place writes show in the version counter
        # both share (`unpack` notes it, `changed_since_unpack` checks it).
        cached = self._tensors[token]
        if type(cached) is torch.nn.Parameter:
            return torch.nn.Parameter(cached.detach(), requires_grad=cached.requires_grad)
        return cached.detach()


class TensorsSentOnce:
    """Controller side, one per job kind (e.g. the sampling job)."""

    def __init__(self):
        self._lock = threading.RLock()  # a job, from packing to its outcome, against `forget` from elsewhere
        self._pids: tuple = ()
        # what the workers got with the last successful job, while the controller still has it
        self._held: "weakref.WeakValueDictionary[str, torch.Tensor]" = weakref.WeakValueDictionary()
        self._job: "SentJob | None" = None

    @contextlib.contextmanager
    def job(self, pids) -> Iterator["SentJob"]:
        """`with sent.job(pool.pids) as job:` then `envelope = job.pack(payload, inline=...)`,
        send it and run the job inside the block. The workers are taken to hold this job's
        tensors if the block ends normally and the job did not `spoil()` them, nothing if it
        raises (whatever the job did with them is not known). `forget()` from another thread
        waits for the block."""
        with self._lock:
            if tuple(pids) != self._pids:  # another pool: its workers hold nothing yet
                self._pids = tuple(pids)
                self._held.clear()
            job = self._job = SentJob(dict(self._held))  # strong while the job runs
            try:
                yield job
            except BaseException:
                self._held.clear()
                raise
            finally:
                self._job = None
            self._held = weakref.WeakValueDictionary({} if job.spoiled else job.used)

    @contextlib.contextmanager
    def forgetting(self) -> Iterator[None]:
        """Forget, and keep jobs out while the block makes the workers drop their copies (a
        job packed in between would count on copies about to go)."""
        with self._lock:
            self.forget()
            yield

    def forget(self) -> None:
        """Send everything again next time (the workers' copies are being dropped)."""
        with self._lock:
            self._held.clear()
            if self._job is not None:  # called from inside a job, on its own thread
                self._job.spoil()


class SentJob:
    def __init__(self, held: dict):
        self._held = held
        self.used: dict[str, torch.Tensor] = {}
        self.reused = 0  # tensors sent as tokens alone
        self.spoiled = False

    def pack(self, payload: dict, inline: tuple = ()) -> dict:
        """The envelope to send instead of `payload`; pickling errors propagate. The tensors
        at `payload[key]` for `inline` keys always travel in the body: the job may change them
        in place (the latent being sampled)."""
        def token(tensor: torch.Tensor) -> str:
            key = tensor_token(tensor)
            self.used[key] = tensor
            return key

        self.used = {}
        buffer = io.BytesIO()
        _TokenPickler(buffer, token, {id(payload[key]) for key in inline if key in payload}).dump(payload)
        held = [k for k in self.used if k in self._held]
        self.reused = len(held)
        return {"body": buffer.getvalue(), "held": held,
                "new": {k: t for k, t in self.used.items() if k not in self._held}}

    def spoil(self) -> None:
        """The workers wrote into a tensor they received (they dropped their copies)."""
        self.spoiled = True


class ReceivedTensors(dict):
    """Worker side: token -> tensor of the last job, and each tensor's version when it was
    handed to the job (`changed_since_unpack`)."""

    def __init__(self):
        super().__init__()
        self.versions: dict[str, int] = {}

    def changed_since_unpack(self) -> bool:
        """Whether the job wrote into a tensor it received (then our copy no longer matches
        the controller's: clear this and have the controller `spoil()` its job)."""
        return any(_version(self[k]) != v for k, v in self.versions.items() if k in self)

    def clear(self) -> None:
        super().clear()
        self.versions = {}


def unpack(envelope: dict, cache: ReceivedTensors) -> Any:
    """Worker side: the payload of `envelope`; `cache` (this job kind's, kept between jobs)
    ends up holding exactly this job's tensors."""
    missing = [k for k in envelope["held"] if k not in cache]
    if missing:  # the controller's view and ours disagree: a bug, not a user error
        raise RuntimeError(f"{len(missing)} tensor(s) the controller believes this worker holds are not cached here")
    tensors = {**{k: cache[k] for k in envelope["held"]}, **envelope["new"]}
    payload = _TokenUnpickler(io.BytesIO(envelope["body"]), tensors).load()
    cache.clear()
    cache.update(tensors)
    cache.versions = {k: _version(t) for k, t in tensors.items()}
    return payload


def is_envelope(obj: Any) -> bool:
    return isinstance(obj, dict) and set(obj) == {"body", "held", "new"}
