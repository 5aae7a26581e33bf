"""`mmlm <command>`: a thin argparse layer over typed functions that are callable from Python too."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable, Sequence


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert

    out = convert(args.format, args.src, args.out, config=args.config)
    print(json.dumps({"converted": str(args.src), "format": args.format, "out": str(out)}))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .convert.hf import export_hf_checkpoint

    out = export_hf_checkpoint(args.src, args.out)
    print(json.dumps({"exported": str(args.src), "format": args.format, "out": str(out)}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmlm", description="CLIP and LLaVA from scratch: train, convert, evaluate, serve.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser("convert", help="convert an OpenAI / open_clip / Hugging Face checkpoint into mmlm format")
    c.add_argument("format", choices=["openai", "open_clip", "hf"])
    c.add_argument("src", type=Path, help="state dict file (openai, open_clip) or model directory (hf)")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--config", type=Path, default=None,
                   help="architecture: open_clip model JSON (required for open_clip) or mmlm config.json")
    c.set_defaults(func=cmd_convert)

    e = sub.add_parser("export", help="export an mmlm checkpoint to another format")
    e.add_argument("format", choices=["hf"])
    e.add_argument("src", type=Path)
    e.add_argument("--out", type=Path, required=True)
    e.set_defaults(func=cmd_export)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (ValueError, KeyError, FileNotFoundError, NotImplementedError) as e:
        # Bad input is the user's to fix: say what is wrong, without a traceback.
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"mmlm {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
