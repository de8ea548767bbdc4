"""The native CPU operator ``pbs2p::bsp_linear``: JIT build of ``csrc/``, a verified cache, loading, ``register_fake``.

The C++ sources ship with the package and are compiled on first use (never at install time) with
``torch.utils.cpp_extension.load`` into ``$PBS2P_KERNEL_CACHE`` (default ``~/.cache/pbs2p/kernels``),
in a directory keyed on the sources, the torch version, the compiler flags and the environment. Nothing
is compiled for the build machine's CPU: the AVX-512 and AVX2 kernels are compiled with per-function
target attributes and chosen at run time, so one cached build serves every x86-64 CPU.

The cache is verified, never trusted: a build happens in a fresh private folder, and only a complete
library is copied into the cache (temporary file, then rename), followed by ``build.json``, a record of
its size and sha256. A cached library is loaded only if it matches its record; otherwise (truncated,
replaced, an interrupted build, an older cache layout) it is rebuilt. ``dlopen`` of a damaged library
can kill the process, so nothing unverified is ever loaded. Processes that build at the same time take
turns on a file lock; the second one finds the first one's verified library.

The first build takes about a minute (``build_seconds()`` says how long building or loading took).
Where it fails (no compiler, no ninja, a non-x86 CPU) :func:`load` returns ``False`` and warns once;
the callers then use the torch path.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from . import packing

CSRC = Path(__file__).parent / "csrc"
SOURCES = (
    "bsp_linear.cpp",
    "parallel_items.cpp",
    "nm_tables.cpp",
    "kernels_scalar.cpp",
    "kernels_avx2.cpp",
    "kernels_avx512.cpp",
    "sweep.cpp",
    "int8_rows.cpp",
    "pair_kernels.cpp",
)
HEADERS = ("kernels.h", "decode_avx512.h", "parallel_items.h")
CFLAGS = ("-O3", "-fno-math-errno", "-fopenmp")
LDFLAGS = ("-fopenmp",)
#: Version of the cache layout (the verified library and its record); part of the build key.
CACHE_LAYOUT = 2
RECORD = "build.json"

_LOCK = threading.Lock()  # one build at a time within the process (the file lock orders processes)


def cache_dir() -> Path:
    """Root of the build cache: ``$PBS2P_KERNEL_CACHE`` or ``~/.cache/pbs2p/kernels``."""
    env = os.environ.get("PBS2P_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pbs2p" / "kernels"


def _build_key() -> str:
    digest = hashlib.sha256()
    for name in SOURCES + HEADERS:
        digest.update(name.encode())
        digest.update((CSRC / name).read_bytes())
    digest.update(" ".join(CFLAGS + LDFLAGS).encode())
    digest.update(torch.__version__.encode())
    digest.update(sys.prefix.encode())  # each environment its own build: ninja rebuilds when the paths change
    digest.update(f"layout {CACHE_LAYOUT}".encode())
    return digest.hexdigest()[:16]


def library_path(key: str | None = None) -> Path:
    """Where the verified library of build ``key`` (default: this installation's) lives in the cache."""
    key = key or _build_key()
    return cache_dir() / key / f"pbs2p_kernels_{key}.so"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verified_library(key: str | None = None) -> Path | None:
    """The cached library of build ``key`` if it matches its ``build.json`` record, else ``None``.

    Reads and hashes the file; never loads it. ``None`` for a missing, truncated or replaced library,
    a missing or unreadable record, or a record of another build.

    >>> verified_library("0" * 16) is None  # nothing was ever built under this key
    True
    """
    key = key or _build_key()
    library = library_path(key)
    try:
        record = json.loads((library.parent / RECORD).read_text())
        if not isinstance(record, dict) or record.get("key") != key:
            return None
        if library.stat().st_size != record.get("size") or _sha256(library) != record.get("sha256"):
            return None
    except (OSError, ValueError):
        return None
    return library


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (``flock``; released by the OS if the holder dies)."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform: builds are still atomic, only not serialized
        yield
        return
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename: readers see all of it or nothing."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _compile(key: str) -> None:
    """Build the library in a private folder, load it, then publish it to the cache with its record."""
    from torch.utils.cpp_extension import load as cpp_load

    directory = library_path(key).parent
    (directory / RECORD).unlink(missing_ok=True)  # from now on the cached library is not trusted
    for stale in directory.glob(".build-*"):  # interrupted builds of earlier processes (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".build-") as build:
        built = cpp_load(
            name=f"pbs2p_kernels_{key}",
            sources=[str(CSRC / name) for name in SOURCES],
            extra_cflags=list(CFLAGS),
            extra_ldflags=list(LDFLAGS),
            build_directory=build,
            is_python_module=False,
            verbose=False,
        )
        built = Path(built) if isinstance(built, str) else Path(build) / f"pbs2p_kernels_{key}.so"
        data = built.read_bytes()
    library = library_path(key)
    _write_atomically(library, data)
    library.chmod(0o755)
    record = {"key": key, "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
              "torch": torch.__version__, "python": sys.prefix, "built": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _write_atomically(directory / RECORD, (json.dumps(record, indent=1) + "\n").encode())


def _build() -> float:
    """Load the operator's library from the verified cache, building it first where needed; the seconds it took."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise RuntimeError(f"the native kernels are x86-64 only, this machine is {platform.machine()}")
    start = time.perf_counter()
    if _registered():  # loaded earlier in this process (a second copy of the library would abort it)
        return time.perf_counter() - start
    key = _build_key()
    directory = library_path(key).parent
    directory.mkdir(parents=True, exist_ok=True)
    with _file_lock(directory / "build.lock"):
        library = verified_library(key)
        if library is None:
            if library_path(key).exists():
                warnings.warn(f"pbs2p: the cached native kernels {library_path(key)} do not match their build record "
                              "(damaged, or an interrupted build); rebuilding them", RuntimeWarning, stacklevel=4)
            _compile(key)  # builds and loads
        else:
            torch.ops.load_library(str(library))
    return time.perf_counter() - start


def _registered() -> bool:
    """Whether ``pbs2p::bsp_linear`` is already an operator of this process."""
    try:
        torch.ops.pbs2p.bsp_linear  # noqa: B018 (the lookup is the test)
    except (AttributeError, RuntimeError):
        return False
    return True


@functools.cache
def _register() -> None:
    """The operator's fake (shape) and autograd formulas, registered once per process."""
    torch.library.register_fake("pbs2p::bsp_linear")(_fake_bsp_linear)
    torch.library.register_autograd("pbs2p::bsp_linear", _backward_bsp_linear, setup_context=_setup_bsp_linear)
    torch.library.register_fake("pbs2p::int8_rows_linear")(_fake_int8_rows_linear)
    torch.library.register_fake("pbs2p::bsp_linear_multi")(_fake_bsp_linear_multi)


@functools.cache
def _load() -> float | None:
    """Seconds the build took, or ``None`` (after one warning) where it failed; computed once per process."""
    try:
        seconds = _build()
        _register()
        return seconds
    except Exception as err:  # no compiler, no ninja, failed build: the torch path runs
        warnings.warn(f"pbs2p: the native CPU kernels are unavailable ({type(err).__name__}: {err}); "
                      "bsp_linear uses the torch path", RuntimeWarning, stacklevel=3)
        return None


def load() -> bool:
    """Build (first use only) and load the operator; ``False``, after one warning, where that fails."""
    with _LOCK:
        return _load() is not None


def sweep_op(W: torch.Tensor):
    """``pbs2p::sweep_groups`` for a float32 CPU weight (the native group loop of the compensated sweep, the same
    arithmetic as the torch loop), or ``None``: another device or dtype, ``PBS2P_KERNEL=torch``, or no build."""
    if W.device.type != "cpu" or W.dtype != torch.float32 or os.environ.get("PBS2P_KERNEL", "").lower() == "torch":
        return None
    return torch.ops.pbs2p.sweep_groups if load() else None


def build_seconds() -> float | None:
    """Seconds :func:`load` spent building or loading from the cache (``None`` before, or if it failed)."""
    return _load() if _load.cache_info().currsize else None


def _fake_bsp_linear(x, codes, alpha, mu, bias, n, m, scale_block):  # noqa: ANN001, ANN202
    torch._check(x.shape[-1] == codes.shape[1] * m, lambda: "in_features do not match codes")
    return x.new_empty((*x.shape[:-1], alpha.shape[0]))


def _fake_bsp_linear_multi(x, codes, alpha, mu, n, m, scale_block):  # noqa: ANN001, ANN202
    return [_fake_bsp_linear(x, c, a, u, None, n, m, scale_block) for c, a, u in zip(codes, alpha, mu, strict=True)]


def _fake_int8_rows_linear(x, q, scale):  # noqa: ANN001, ANN202
    return x.new_empty((*x.shape[:-1], q.shape[0]))


def _setup_bsp_linear(ctx, inputs, output) -> None:  # noqa: ANN001
    x, codes, alpha, mu, bias, n, m, scale_block = inputs
    ctx.save_for_backward(x, codes, alpha, mu, bias)
    ctx.pattern = (n, m, scale_block)


def _backward_bsp_linear(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN202
    """Gradients of ``x @ W_hat.T + bias`` in plain torch ops (``W_hat = kept * (alpha * t + mu)``)."""
    x, codes, alpha, mu, bias = ctx.saved_tensors
    n, m, scale_block = ctx.pattern
    need = ctx.needs_input_grad
    out, k = alpha.shape[0], x.shape[-1]
    grad_x = grad_alpha = grad_mu = grad_bias = None
    if need[0]:
        grad_x = grad @ packing.dequantize(codes, alpha, mu, n, m, scale_block, dtype=grad.dtype)
    if need[2] or need[3]:
        dw = grad.reshape(-1, out).float().T @ x.reshape(-1, k).float()  # dL/dW_hat
        ternary = packing.unpack_ternary(codes, n, m, out).float()
        blocks = alpha.shape[1]

        def per_block(v: torch.Tensor) -> torch.Tensor:
            if blocks == 1:
                return v.sum(-1, keepdim=True)
            padded = torch.nn.functional.pad(v, (0, blocks * scale_block - k))
            return padded.unflatten(-1, (blocks, -1)).sum(-1)

        if need[2]:
            grad_alpha = per_block(dw * ternary).to(alpha.dtype)
        if need[3]:
            grad_mu = per_block(dw * ternary.abs()).to(mu.dtype)
    if bias is not None and need[4]:
        grad_bias = grad.reshape(-1, out).sum(0).to(bias.dtype)
    return grad_x, None, grad_alpha, grad_mu, grad_bias, None, None, None


def isa() -> str:
    """ISA of the kernels the operator runs: ``"avx512"``, ``"avx2"`` or ``"scalar"`` (needs :func:`load`)."""
    return torch.ops.pbs2p._kernel_isa()


def supported_isas() -> list[str]:
    """ISAs whose kernels this CPU can run, e.g. ``["scalar", "avx2", "avx512"]`` (needs :func:`load`)."""
    return list(torch.ops.pbs2p._supported_kernel_isas())


def set_isa(name: str) -> str:
    """Run the ``name`` kernels: ``avx512``, ``avx2``, ``scalar`` or ``best``; raises if the CPU lacks it."""
    return torch.ops.pbs2p._set_kernel_isa(name)


@contextlib.contextmanager
def use_isa(name: str) -> Iterator[str]:
    """Context manager around :func:`set_isa` that restores the previous ISA on exit (tests, benchmarks)."""
    previous = isa()
    try:
        yield set_isa(name)
    finally:
        set_isa(previous)
