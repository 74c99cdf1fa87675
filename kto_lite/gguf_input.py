"""GGUF files as base models: converted once into a transformers folder, then loaded like any other.

A .gguf file (llama.cpp, Ollama, LM Studio) holds quantized weights, the config and the tokenizer
with its chat template. transformers reads it (`from_pretrained(folder, gguf_file=NAME)`) and
de-quantizes every tensor. That takes a while and the result is the same every time, so it is done
once and saved (safetensors + tokenizer) to $KTO_LITE_CACHE/gguf/<file stem>-<key>, the key hashing
the file's absolute path, size and modification time. Every later load, 4-bit (bitsandbytes NF4)
or unquantized, reads that folder: an ordinary model folder, so the reference-cache fingerprint,
chat, export and the app all see a plain local model.

`model:` may name
- a .gguf file,
- a folder holding exactly one .gguf file and no config.json (several: an error listing them),
- `owner/repo/file.gguf`: a GGUF file in a Hub repository (downloaded by huggingface_hub, which
  reads the token from HF_TOKEN or `hf auth login`; `revision` picks the branch/tag/commit).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

from kto_lite.errors import ConfigError
from kto_lite.files import DiskFullError, atomic_path, remove_partials

FORMAT = "2"  # part of the cache key: bump when the conversion changes, so old folders are not reused
SOURCE_FILE = "kto_lite_gguf.json"  # written last into a converted folder: which file it came from, and its files


MAGIC = b"GGUF"  # the first four bytes of every GGUF file
NOT_A_GGUF_FOLDER = ("config.json", "adapter_config.json", "tokenizer_config.json")  # transformers / peft folders


def gguf_source(name: str, *, revision: str | None = None) -> Path | None:
    """The GGUF file `name` stands for, or None when `name` is not a GGUF model."""
    path = Path(name).expanduser()
    if path.is_dir():
        if any((path / f).is_file() for f in NOT_A_GGUF_FOLDER):  # even with a .gguf next to them (an export)
            return None
        found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise ConfigError(f"{path} holds {len(found)} .gguf files ({names}); set model to one of them")
        return found[0] if found else None
    if path.is_file():  # by suffix, or by content: Ollama keeps its GGUF files as blobs/sha256-... files
        return path if path.suffix.lower() == ".gguf" or _starts_with_magic(path) else None
    if path.suffix.lower() == ".gguf":
        return _hub_gguf(name, revision)
    return None


def _starts_with_magic(path: Path) -> bool:
    with contextlib.suppress(OSError), open(path, "rb") as f:
        return f.read(4) == MAGIC
    return False


def _hub_gguf(name: str, revision: str | None) -> Path:
    """`owner/repo/path/file.gguf` on the Hub, fetched into the Hub cache (once)."""
    parts = name.split("/")
    if len(parts) < 3 or name.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{name}: no such .gguf file")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:])
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename, revision=revision))
    except Exception as e:  # noqa: BLE001 - offline, gated, missing: the message says which
        raise FileNotFoundError(
            f"{name}: not a file here, and the Hub did not give {filename!r} from repository {repo!r} "
            f"({type(e).__name__}: {e})"
        ) from e


def cache_root() -> Path:
    return Path(os.environ.get("KTO_LITE_CACHE", Path.home() / ".cache" / "kto_lite")) / "gguf"


def _target(gguf: Path) -> Path:
    """Where the conversion of this very file (path, size, modification time) lives in the cache."""
    return cache_root() / f"{gguf.stem}-{_key(gguf)}"


def converted_config(gguf: Path) -> dict | None:
    """config.json of the file's conversion when it is in the cache already (None: not converted yet)."""
    target = _target(gguf.resolve())
    return json.loads((target / "config.json").read_text()) if (target / SOURCE_FILE).is_file() else None


def converted_dir(gguf: Path) -> Path:
    """The transformers folder converted from `gguf`; converts it first if it is not in the cache, or again if
    the cached copy is damaged (`damage`: a file missing, cut short or changed since the conversion)."""
    gguf = gguf.resolve()
    target = _target(gguf)
    if (target / SOURCE_FILE).is_file() and damage(target) is None:
        return target
    with _lock(target):
        if not (target / SOURCE_FILE).is_file():  # another process may have converted it meanwhile
            _convert(gguf, target)
            _remove_older_conversions(gguf, keep=target)
        elif (why := damage(target)) is not None:  # said in the conversion's first line
            _convert(gguf, target, damaged=why)
    return target


def _files(folder: Path) -> dict:
    """{name: [size, sha256, mtime_ns]} of a converted folder's files (its record, SOURCE_FILE)."""
    out = {}
    for f in sorted(folder.iterdir()):
        if f.is_file() and f.name != SOURCE_FILE:
            stat = f.stat()
            out[f.name] = [stat.st_size, _sha256(f), stat.st_mtime_ns]
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(2**24), b""):
            h.update(block)
    return h.hexdigest()


def damage(folder: Path) -> str | None:
    """What is wrong with a converted folder, None when nothing is: every recorded file there with its size, and
    its checksum where its modification time moved (a file rewritten in place). Sizes are checked on every
    load, checksums only then: hashing gigabytes on every load would cost more than it finds."""
    try:
        record = json.loads((folder / SOURCE_FILE).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{SOURCE_FILE} is unreadable"
    for name, (size, sha256, mtime_ns) in record.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        stat = path.stat()
        if stat.st_size != size:
            return f"{name} has {stat.st_size} bytes, {size} were written"
        if stat.st_mtime_ns != mtime_ns and _sha256(path) != sha256:
            return f"{name} changed since it was written (checksum)"
    return None


def _key(gguf: Path) -> str:
    stat = gguf.stat()
    return hashlib.sha256(f"{FORMAT}:{gguf}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]


@contextlib.contextmanager
def _lock(target: Path):
    """One process converts (torchrun ranks, the app and a CLI run); the others wait, then reuse it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: the atomic rename alone keeps the cache consistent
        yield
        return
    with open(target.parent / f".{target.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _convert(gguf: Path, target: Path, damaged: str | None = None) -> None:
    """De-quantize `gguf` and write it as safetensors + tokenizer to `target`, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    kind = _metadata_string(gguf, "general.type")
    if kind not in (None, "model"):  # e.g. "adapter": a LoRA exported for llama.cpp, not a base model
        raise ConfigError(f"{gguf} is a GGUF {kind}, not a model: give the base model's GGUF file")
    size_gb = gguf.stat().st_size / 1e9
    why = f" again, its converted copy was damaged ({damaged})" if damaged else ", once"
    print(f"converting {gguf} ({size_gb:.1f} GB) into a transformers folder{why}: {target}", file=sys.stderr,
          flush=True)
    try:  # dequantize=True: plain weights even where a GGUF matmul kernel is installed
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, quantization_config=GgufConfig(dequantize=True),
            device_map={"": "cpu"})
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ValueError as e:  # transformers: "GGUF model with architecture X is not supported yet."
        raise ConfigError(f"{gguf}: transformers cannot read this GGUF file: {e}") from e
    forget_gguf_quantization(model)

    remove_partials(target.parent)  # left by a killed conversion
    n = sum(p.numel() for p in model.parameters())
    needed = sum(p.numel() * p.element_size() for p in model.parameters())
    try:
        print(f"writing {n / 1e6:.0f}M parameters ({model.dtype}) to {target}", file=sys.stderr, flush=True)
        with atomic_path(target, folder=True, needed=needed) as tmp:  # a reader sees no folder or a complete one
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            stat = gguf.stat()
            (tmp / SOURCE_FILE).write_text(json.dumps(
                {"gguf": str(gguf), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "format": FORMAT,
                 "files": _files(tmp)}, indent=1))
    except OSError as e:
        hint = (f"converting {gguf} failed while writing to {target.parent} ({e}); the converted model takes about "
                "4 bytes per parameter: set KTO_LITE_CACHE to a disk with room")
        raise (DiskFullError(target, hint, needed) if isinstance(e, DiskFullError) else OSError(hint)) from e


def _metadata_string(gguf: Path, key: str) -> str | None:
    """A string field of the file's metadata: transformers' reader maps the header only (~0.1 s)."""
    try:
        from transformers.integrations.gguf.reader import read_gguf_metadata
    except ImportError:  # another transformers version: skip the check, the conversion still says what fails
        return None
    try:
        value = read_gguf_metadata(str(gguf))[0].get(key)
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file: say which file
        raise ConfigError(f"{gguf}: not a readable GGUF file ({type(e).__name__}: {e})") from e
    return None if value is None else str(value)


def forget_gguf_quantization(model) -> None:
    """A de-quantized GGUF model still says "quantized (gguf)"; it is plain weights: drop that, or
    save_pretrained refuses and later loads would look for the GGUF file."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _remove_older_conversions(gguf: Path, keep: Path) -> None:
    """A file that changed (new size or mtime) gets a new key; its old conversion is dead weight."""
    for folder in cache_root().iterdir():
        info = folder / SOURCE_FILE
        if folder == keep or not info.is_file():
            continue
        with contextlib.suppress(OSError, ValueError):
            if json.loads(info.read_text()).get("gguf") == str(gguf):
                shutil.rmtree(folder)
