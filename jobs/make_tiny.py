"""Build the tiny offline judge model: `python -m jobs.make_tiny --out DIR [--seed N] [--vocab-size V ...]`.

The output is an HF model directory (random Qwen2 + byte-level BPE tokenizer with a ChatML template)
that every job accepts as `model.path`. Same seed and sizes -> byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import fields

from rmr1_ray.tiny import TinySpec, make_tiny


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.make_tiny",
        description="Build a tiny random Qwen2 model and a BPE tokenizer trained on the spot (no model hub).",
        epilog="Example:\n  python -m jobs.make_tiny --out runs/tiny --seed 0",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory (created if missing)")
    parser.add_argument(
        "--seed", type=int, default=0, help="weight seed (the tokenizer does not depend on it)"
    )
    defaults = TinySpec()
    for field in fields(TinySpec):  # one flag per spec field, e.g. --vocab-size, --tie-word-embeddings
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        if isinstance(default, bool):
            parser.add_argument(
                flag, action=argparse.BooleanOptionalAction, default=default, help=f"(default: {default})"
            )
        else:
            parser.add_argument(flag, type=int, default=default, help=f"(default: {default})")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        spec = TinySpec(**{f.name: getattr(args, f.name) for f in fields(TinySpec)})
    except ValueError as exc:
        parser.error(str(exc))
    start = time.perf_counter()
    out = make_tiny(args.out, seed=args.seed, spec=spec)
    meta = json.loads((out / "rmr1_tiny.json").read_text())
    print(f"wrote tiny model to {out} in {time.perf_counter() - start:.1f}s")
    for path in sorted(out.iterdir()):
        print(f"  {path.name:<24} {path.stat().st_size:>10,} bytes")
    print(
        f"parameters: {meta['num_parameters']:,}  vocab: {meta['model_vocab_size']}  "
        f"head_dim: {meta['head_dim']}  seed: {args.seed}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
