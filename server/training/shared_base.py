"""Shares the server's resident NF4 base with training workers: one read-only shared arena, rebuilt in the worker.

Server side (:meth:`SharedBase.export`, once, right after the base model is loaded and *before* any forward):
every tensor of the base -- each bitsandbytes ``Params4bit`` (packed 4-bit data, uint8) with its ``QuantState``
tensors (absmax: uint8 with double quantization, else float32; the nested state's absmax and code: float32; the
quantile code: float32 [16]; offset: float32 scalar), every other parameter (embeddings, norms, lm_head, in the
compute dtype) and every buffer (rotary ``inv_freq``) -- is copied into one flat uint8 *arena* on the model's
device, 256-byte aligned per storage, and the model's own tensors are re-pointed into it (``Tensor.set_``), so the
server holds the base once. On a CPU the arena is an unlinked POSIX shared-memory file (torch's file-descriptor
sharing, ``UntypedStorage._new_using_fd_cpu``), handed to the worker as an inherited descriptor (``Popen``'s
``pass_fds``); on CUDA it is one allocation, handed over as a CUDA IPC handle (``torch.multiprocessing.reductions
.reduce_tensor``). Metadata a serving forward later changes (bitsandbytes repacks ``Linear4bit`` weights for CPU
inference the first time it runs in eval/no-grad mode: it *replaces* ``weight.data`` and the ``QuantState``'s
absmax, never writes them in place) is recorded at export, so workers always get the original layout.

Worker side (:func:`attach`): builds the architecture on the meta device, lets transformers' bitsandbytes quantizer
swap the linears for ``Linear4bit`` exactly as ``from_pretrained`` does, and gives every parameter, buffer and
``QuantState`` a view of the arena: no weight file is read, nothing is quantized, no base byte is copied. On a CPU
the worker's mapping of the arena is made read-only (``mprotect``): a stray write kills the worker with SIGSEGV
instead of corrupting serving. The worker stays a separate process, so its crash or OOM never reaches the server.
"""

from __future__ import annotations

import copy
import ctypes
import ctypes.util
import hashlib
import logging
import mmap
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from server.errors import FailedPrecondition

log = logging.getLogger(__name__)

#: File in a job directory holding the hand-off (pickled :class:`_Handoff`), written by the manager.
HANDOFF_FILE = "shared_base.pkl"
#: Byte alignment of every storage inside the arena (covers every dtype and CUDA's vectorised loads).
ALIGN = 256


class SharingUnavailable(Exception):
    """The base cannot be shared (not an NF4 bitsandbytes model, already repacked, mixed devices, ...)."""


@dataclass(frozen=True)
class _Ref:
    """A tensor as a view of the arena: byte ``offset`` of its first element, dtype name, shape and stride
    (elements)."""

    offset: int
    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(frozen=True)
class _Quant:
    """A ``Params4bit`` and its ``QuantState`` as recorded at export (before any repacking)."""

    data: _Ref
    absmax: _Ref
    code: _Ref
    offset: _Ref | None
    state2_absmax: _Ref | None
    state2_code: _Ref | None
    state2_blocksize: int | None
    shape: tuple[int, ...]
    dtype: str
    blocksize: int
    quant_type: str
    param_blocksize: int
    compress_statistics: bool
    quant_storage: str


@dataclass(frozen=True)
class _Entry:
    """One parameter or buffer of one module: ``kind`` is ``"param"``, ``"buffer"`` or ``"params4bit"``; ``key``
    identifies the tensor object on the server (tied weights share a key and become one object in the worker)."""

    module: str
    name: str
    kind: str
    key: int
    ref: _Ref | None = None
    quant: _Quant | None = None


@dataclass(frozen=True)
class _Handoff:
    """What a worker needs: the arena (CPU: inherited descriptor ``fd`` of ``nbytes``; CUDA: torch's IPC rebuild
    function and arguments), the entries, the HF config, the server's ``BaseModelInfo`` and quantization config."""

    nbytes: int
    device: str
    fd: int | None
    cuda_rebuild: Any
    entries: tuple[_Entry, ...]
    hf_config: Any
    info: Any
    quantization_config: Any


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class SharedBase:
    """The server's base model held in one shareable arena (see the module docstring).

    Attributes:
        nbytes: bytes of the arena (every distinct base storage, 256-byte aligned; for SmolLM2-135M NF4 with
            double quant and bfloat16 embeddings about 110 MB).
        device: the model's device.
    """

    def __init__(self, arena: torch.Tensor, entries: tuple[_Entry, ...], hf_config, info, quantization_config):
        self._arena = arena  # kept alive for the server's lifetime: workers map it
        self._entries = entries
        self._hf_config = hf_config
        self._info = info
        self._qc = quantization_config
        self.nbytes = int(arena.numel())
        self.device = arena.device
        self._fd: int | None = None
        if arena.device.type == "cpu":
            self._fd = int(arena.untyped_storage()._share_fd_cpu_()[0])  # already shared: returns its fd

    @classmethod
    def export(cls, model: torch.nn.Module, info, quantization_config) -> "SharedBase":
        """Move every tensor of ``model`` (an NF4 ``from_pretrained`` model, not yet run) into a new shared arena,
        re-pointing the model's own tensors there (values unchanged, bit for bit).

        Args:
            model: the loaded base (``server.model.base.load_base_model``), on one device, never run forward.
            info: its ``BaseModelInfo`` (handed to workers as is).
            quantization_config: the ``BitsAndBytesConfig`` it was loaded with (``server.model.base
                .quantization_config``).

        Raises:
            SharingUnavailable: a tensor on another device or the meta device, a ``Linear4bit`` weight already
                repacked for CPU inference, or no 4-bit weight at all; the model is left untouched.
        """
        import bitsandbytes as bnb

        tensors: dict[int, torch.Tensor] = {}  # id -> tensor object to re-point
        plan: list[tuple] = []  # (module, name, kind, tensor, quant fields)

        def note(t: torch.Tensor) -> torch.Tensor:
            if t.device.type == "meta":
                raise SharingUnavailable("a base tensor is on the meta device (offloaded weights)")
            tensors.setdefault(id(t), t)
            return t

        n4 = 0
        for mname, module in model.named_modules():
            for pname, p in module._parameters.items():
                if p is None:
                    continue
                if isinstance(p, bnb.nn.Params4bit):
                    qs = p.quant_state
                    if qs is None or getattr(qs, "packing_format_for_cpu", False):
                        raise SharingUnavailable(f"{mname}.{pname} was already repacked for CPU inference (the "
                                                 "base must be exported before its first forward)")
                    n4 += 1
                    quant = dict(absmax=note(qs.absmax), code=note(qs.code),
                                 offset=note(qs.offset) if qs.nested else None,
                                 state2_absmax=note(qs.state2.absmax) if qs.nested else None,
                                 state2_code=note(qs.state2.code) if qs.nested else None,
                                 state2_blocksize=int(qs.state2.blocksize) if qs.nested else None,
                                 shape=tuple(qs.shape), dtype=_dtype_name(qs.dtype), blocksize=int(qs.blocksize),
                                 quant_type=str(qs.quant_type), param_blocksize=int(p.blocksize),
                                 compress_statistics=bool(p.compress_statistics),
                                 quant_storage=_dtype_name(p.quant_storage))
                    plan.append((mname, pname, "params4bit", note(p), quant))
                else:
                    plan.append((mname, pname, "param", note(p), None))
            for bname, b in module._buffers.items():
                if b is not None:
                    plan.append((mname, bname, "buffer", note(b), None))
        if n4 == 0:
            raise SharingUnavailable("the base has no bitsandbytes 4-bit weight")
        devices = {t.device for t in tensors.values()}
        if len(devices) != 1:
            raise SharingUnavailable(f"the base spans several devices ({sorted(map(str, devices))})")
        device = devices.pop()

        slots: dict[tuple[int, int], int] = {}  # (storage data_ptr, nbytes) -> arena byte offset
        total = 0
        for t in tensors.values():
            st = t.untyped_storage()
            key = (st.data_ptr(), st.nbytes())
            if key not in slots:
                slots[key] = total
                total += -(-st.nbytes() // ALIGN) * ALIGN
        if device.type == "cpu":
            arena = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_using_fd_cpu(max(total, 1)))
        else:
            arena = torch.empty(max(total, 1), dtype=torch.uint8, device=device)
        offsets: dict[int, int] = {}  # tensor id -> byte offset of its first element in the arena
        with torch.no_grad():
            for t in tensors.values():
                st = t.untyped_storage()
                base = slots[(st.data_ptr(), st.nbytes())]
                offsets[id(t)] = base + t.storage_offset() * t.element_size()
            copied = set()
            for t in tensors.values():
                st = t.untyped_storage()
                key = (st.data_ptr(), st.nbytes())
                if key not in copied:
                    copied.add(key)
                    src = torch.empty(0, dtype=torch.uint8, device=device).set_(st)
                    arena[slots[key]:slots[key] + st.nbytes()].copy_(src)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            storage = arena.untyped_storage()
            for t in tensors.values():  # from here on the model's tensors live in the arena
                t.set_(storage, offsets[id(t)] // t.element_size(), t.size(), t.stride())
        if device.type == "cuda":
            torch.cuda.empty_cache()  # hand the old copies' blocks back: the KV cache is sized from free memory

        def ref(t: torch.Tensor) -> _Ref:
            return _Ref(offsets[id(t)], _dtype_name(t.dtype), tuple(t.shape), tuple(t.stride()))

        entries = []
        for mname, pname, kind, t, quant in plan:
            q = None
            if quant is not None:
                q = _Quant(data=ref(t), **{k: (ref(v) if isinstance(v, torch.Tensor) else v)
                                           for k, v in quant.items()})
            entries.append(_Entry(mname, pname, kind, id(t), None if q else ref(t), q))
        hf_config = copy.deepcopy(model.config)
        if hasattr(hf_config, "quantization_config"):
            del hf_config.quantization_config
        shared = cls(arena, tuple(entries), hf_config, info, quantization_config)
        log.info("base model shared for training: %d tensors in one %s arena of %d bytes (%d 4-bit weights)",
                 len(tensors), device, shared.nbytes, n4)
        return shared

    def checksum(self) -> str:
        """SHA-256 (hex) of the arena's bytes: every base tensor the server serves with and workers train on."""
        data = self._arena.detach().to("cpu")
        return hashlib.sha256(data.numpy().tobytes()).hexdigest()

    def handoff(self, job_dir: Path) -> tuple[int, ...]:
        """Write ``job_dir/HANDOFF_FILE`` for a worker and return the descriptors its ``Popen`` must pass
        (``pass_fds``; the arena's on a CPU, none on CUDA). When that fails (a full disk, a CUDA error) it logs
        why, leaves no hand-off and returns ``()``: the worker then loads its own base."""
        path = Path(job_dir) / HANDOFF_FILE
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            cuda_rebuild = None
            if self._fd is None:  # a CUDA IPC handle, with its own slot in torch's IPC reference counting
                from torch.multiprocessing.reductions import reduce_tensor

                cuda_rebuild = reduce_tensor(self._arena)
            payload = _Handoff(self.nbytes, str(self.device), self._fd, cuda_rebuild, self._entries,
                               self._hf_config, self._info, self._qc)
            tmp.write_bytes(pickle.dumps(payload))
            os.replace(tmp, path)
        except (OSError, RuntimeError, pickle.PicklingError) as exc:
            log.warning("cannot hand the shared base to the job in %s (%s); it loads its own", job_dir, exc)
            tmp.unlink(missing_ok=True)
            return ()
        return () if self._fd is None else (self._fd,)


def export_for_training(model, info, model_config) -> SharedBase | None:
    """:meth:`SharedBase.export` of the server's freshly loaded base, or None -- with a WARNING saying why -- when
    it cannot be shared (jobs then load their own copy). ``model_config`` is the server's ``ModelConfig``."""
    from server.model.base import quantization_config

    try:
        qc = quantization_config(model_config, info.compute_dtype or str(next(model.parameters()).dtype)[6:])
        return SharedBase.export(model, info, qc)
    except (SharingUnavailable, ImportError, RuntimeError) as exc:  # RuntimeError: out of (shared) memory
        log.warning("training jobs will load their own copy of the base model: it cannot be shared (%s)", exc)
        return None


# ------------------------------------------------------------------------------------------------- worker side


def _protect_read_only(arena: torch.Tensor) -> None:
    """Make this process's mapping of a CPU arena read-only (``mprotect(PROT_READ)``): a write then raises SIGSEGV.
    Raises OSError when the kernel refuses."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    page = mmap.PAGESIZE
    start = arena.data_ptr() // page * page
    length = arena.data_ptr() + arena.numel() - start
    if libc.mprotect(ctypes.c_void_p(start), ctypes.c_size_t(length), mmap.PROT_READ) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mprotect of the shared base failed: {os.strerror(err)}")


def _indexed(device: torch.device) -> torch.device:
    """``cuda`` → ``cuda:<current device>``, so that devices compare equal however they were spelled."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _view(arena: torch.Tensor, r: _Ref) -> torch.Tensor:
    dtype = _dtype(r.dtype)
    size = torch.empty(0, dtype=dtype).element_size()
    return torch.empty(0, dtype=dtype, device=arena.device).set_(arena.untyped_storage(), r.offset // size,
                                                                 r.shape, r.stride)


def attach(job_dir: Path, model_config):
    """Rebuild, in a worker, the server's base model around the shared arena described in ``job_dir/HANDOFF_FILE``.

    Args:
        job_dir: the job directory (its hand-off file was written by :meth:`SharedBase.handoff`).
        model_config: the job's ``ModelConfig``; its device must be the server's.

    Returns:
        ``(model, info, nbytes)``: the ``*ForCausalLM`` in eval mode with gradients off, whose every parameter,
        buffer and ``QuantState`` tensor is a view of the arena; the server's ``BaseModelInfo``; the arena's
        size (bytes).

    Raises:
        FailedPrecondition: no hand-off, a device mismatch, or a rebuilt model that is incomplete (field
            ``model``). The caller falls back to loading.
    """
    import bitsandbytes as bnb
    from bitsandbytes.functional import QuantState
    from transformers import AutoModelForCausalLM
    from transformers.quantizers.auto import AutoHfQuantizer

    from server.model.base import resolve_device

    path = Path(job_dir) / HANDOFF_FILE
    try:
        payload: _Handoff = pickle.loads(path.read_bytes())
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError) as exc:
        raise FailedPrecondition(f"no usable shared base hand-off ({exc})", field="model") from exc
    device = _indexed(resolve_device(model_config.device))
    if _indexed(torch.device(payload.device)) != device:
        raise FailedPrecondition(f"the shared base is on {payload.device}, the job trains on {device}",
                                 field="model")
    if payload.fd is not None:
        storage = torch.UntypedStorage._new_shared_fd_cpu(payload.fd, payload.nbytes)
        arena = torch.empty(0, dtype=torch.uint8).set_(storage)
        _protect_read_only(arena)
    else:
        rebuild, args = payload.cuda_rebuild
        arena = rebuild(*args)

    info = payload.info
    dtype = _dtype(info.compute_dtype) if info.compute_dtype else None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(payload.hf_config, dtype=dtype, attn_implementation="sdpa")
    quantizer = AutoHfQuantizer.from_config(payload.quantization_config, pre_quantized=False)
    quantizer.preprocess_model(model, device_map={"": device})
    made: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for e in payload.entries:
            module = model.get_submodule(e.module)
            obj = made.get(e.key)
            if obj is None:
                if e.kind == "params4bit":
                    q = e.quant
                    state2 = None
                    if q.state2_absmax is not None:
                        state2 = QuantState(absmax=_view(arena, q.state2_absmax), code=_view(arena, q.state2_code),
                                            blocksize=q.state2_blocksize, dtype=torch.float32)
                    offset = _view(arena, q.offset) if q.offset is not None else None
                    qs = QuantState(absmax=_view(arena, q.absmax), shape=torch.Size(q.shape),
                                    code=_view(arena, q.code), blocksize=q.blocksize, quant_type=q.quant_type,
                                    dtype=_dtype(q.dtype), offset=offset, state2=state2)
                    obj = bnb.nn.Params4bit(_view(arena, q.data), requires_grad=False, quant_state=qs,
                                            blocksize=q.param_blocksize, compress_statistics=q.compress_statistics,
                                            quant_type=q.quant_type, quant_storage=_dtype(q.quant_storage),
                                            module=module, bnb_quantized=True)
                elif e.kind == "param":
                    obj = torch.nn.Parameter(_view(arena, e.ref), requires_grad=False)
                else:
                    obj = _view(arena, e.ref)
                made[e.key] = obj
            if e.kind == "buffer":
                module._buffers[e.name] = obj
            else:
                if e.name not in module._parameters:
                    raise FailedPrecondition(f"rebuilt model lacks parameter {e.module}.{e.name}", field="model")
                module._parameters[e.name] = obj
                if e.kind == "params4bit":
                    module.weight.module = module
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise FailedPrecondition(f"rebuilt model has tensors the server did not share: {left[:5]}", field="model")
    quantizer.postprocess_model(model)
    model.hf_quantizer = quantizer
    model.eval()
    model.requires_grad_(False)
    return model, info, payload.nbytes


def worker_loader(job_dir: Path, emit):
    """The ``load_base`` a worker gives ``trainer.train.train``: the shared base when ``job_dir`` holds a hand-off,
    else -- or when attaching fails, with a WARNING saying why -- ``load_base_model``. Either way it reports which
    through ``emit``: ``{"event": "base", "phase": "loading", "source": "shared" | "loaded", "bytes": N,
    "seconds": S, "message": "base: shared from the server (N bytes)" | "base: loaded (...)"}`` (S: seconds it
    took to get the base)."""

    def load(model_config):
        from server.model.base import load_base_model

        t0 = time.monotonic()
        reason = "the server did not share its base"
        if (Path(job_dir) / HANDOFF_FILE).is_file():
            try:
                model, info, nbytes = attach(job_dir, model_config)
            except Exception as exc:  # noqa: BLE001 - any failure to attach falls back to loading
                reason = f"sharing failed: {type(exc).__name__}: {exc}"
                log.warning("base: %s; loading it", reason)
            else:
                message = f"base: shared from the server ({nbytes} bytes)"
                log.info("%s in %.2f s", message, time.monotonic() - t0)
                emit({"event": "base", "phase": "loading", "source": "shared", "bytes": nbytes,
                      "seconds": time.monotonic() - t0, "message": message})
                return model, info
        model, _, info = load_base_model(model_config)
        message = f"base: loaded ({reason})"
        log.info("%s in %.2f s", message, time.monotonic() - t0)
        emit({"event": "base", "phase": "loading", "source": "loaded", "bytes": int(info.weight_bytes),
              "seconds": time.monotonic() - t0, "message": message})
        return model, info

    return load
