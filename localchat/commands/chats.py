"""`localchat chats`: the saved conversations (list, Markdown export, fine-tune dataset)."""

from __future__ import annotations

import argparse
import sys

from ..fsutil import atomic_write_text
from ..store.chats import ChatHistory, write_dataset
from ..store.paths import chats_dir


def chats(args: argparse.Namespace) -> int:
    history = ChatHistory(chats_dir())
    if args.action == "list":
        infos = history.list()
        if not infos:
            print(f"no saved chats in {history.root}")
        for c in infos:
            print(f"{c.id}  {c.updated}  {c.turns:3d} messages  {c.model or '-'}  {c.title}")
    elif args.action == "export":
        text = history.load(args.id).to_markdown()
        if args.output:
            atomic_write_text(args.output, text)
            print(f"wrote {args.output}", file=sys.stderr)
        else:
            print(text)
    elif args.action == "dataset":
        out = write_dataset(history, args.ids, args.output)
        print(f"wrote {len(args.ids)} chats to {out}; train with `localchat finetune --data {out}`")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="localchat chats", description=__doc__)
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="saved chats, newest first")
    ex = sub.add_parser("export", help="a chat as Markdown")
    ex.add_argument("id")
    ex.add_argument("-o", "--output", help="write to this file (default: stdout)")
    ds = sub.add_parser("dataset", help="picked chats as a chat JSONL fine-tune dataset")
    ds.add_argument("ids", nargs="+", metavar="ID")
    ds.add_argument("-o", "--output", required=True, help="the .jsonl file to write")
    return parser


def main(argv: list[str] | None = None) -> int:
    return chats(build_parser().parse_args(argv))
