"""The one place that loads models and tokenizers (local directory or hub name).

Importing this module touches no files and no network: loading happens only when a function is called.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # transformers is imported lazily: it is slow to import and not every caller needs it
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def torch_dtype(name: str) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' (and the short forms fp32/bf16/fp16) -> torch.dtype."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


def _looks_local(path: str) -> bool:
    # A hub id is "name" or "org/name": never more than one "/", never a leading "/", "." or "~".
    # Anything else that names a directory-like path is meant as a local path, and a typo in it must
    # fail here with the path in the message instead of as a confusing hub lookup error.
    if path.startswith(("/", ".", "~")):
        return True
    if os.sep != "/" and os.sep in path:  # Windows-style separators are never part of a hub id
        return True
    if path.count("/") > 1:
        return True
    # "runs/tiny" when ./runs exists: a relative local path, not org "runs" on the hub.
    return "/" in path and Path(path.split("/", 1)[0]).is_dir()


def _resolve(path: str) -> str:
    if not path or not path.strip():
        raise ValueError("model/tokenizer path is empty")
    if _looks_local(path):
        local = Path(path).expanduser()
        if not local.exists():
            raise FileNotFoundError(
                f"model/tokenizer path {path!r} does not exist "
                f"(run `rmr1 make-tiny --out {path}` to build a tiny offline model there)"
            )
        return str(local)
    return path


def load_tokenizer(path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load a tokenizer; pad_token falls back to eos_token. padding_side is left as saved (callers set it)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_resolve(path), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def default_attn_implementation(device: str, dtype: str) -> str:
    """flash_attention_2 on CUDA when flash_attn is installed and the dtype is half precision, else sdpa."""
    # flash-attn kernels only exist for fp16/bf16; an fp32 model would fail at the first forward.
    # "auto" keeps whatever the checkpoint holds, possibly fp32, so it does not count as half precision.
    half = dtype in ("bfloat16", "bf16", "float16", "fp16", "half")
    if device.startswith("cuda") and half and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def load_causal_lm(
    path: str,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    device: str = "cpu",
) -> PreTrainedModel:
    """Load a causal LM in eval mode on `device`. dtype: float32 | bfloat16 | float16 | auto (as saved)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        _resolve(path),
        dtype="auto" if dtype == "auto" else torch_dtype(dtype),
        trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation or default_attn_implementation(device, dtype),
    )
    return model.to(device).eval()
