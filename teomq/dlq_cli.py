"""``teomq dlq list|show|replay|purge -broker ADDR``: the broker's dead-letter queue.

It talks to the broker over its own port: one API command (131, ``ApiCommand.DLQ``) per call,
a msgpack request ``{"op": ..., ...}`` answered with a msgpack map (docs/semantics.md, "The
dead-letter queue"). Permissions come with the later security work: any client may call it.
"""

from __future__ import annotations

import argparse
import base64
import datetime
import json
import sys
from typing import Any

import msgpack

from teomq.argtypes import flag, float_value, int_at_least
from teomq.commands import DLQ_LIST_MAX

DESCRIPTION = ("The broker's dead-letter queue: messages that failed -max-deliveries times, crashed their "
               "consumers -max-crashes times, or were rejected by a consumer. list: one line each; show ID: "
               "one in full (payload, history); replay ID... | -all: back into their queues as new messages; "
               "purge ID... | -all: drop them.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("list", "show", "replay", "purge"), help="what to do")
    parser.add_argument("ids", nargs="*", type=int, metavar="ID", help="dead letter ids (show: one; replay, purge)")
    flag(parser, "broker", required=True, metavar="BROKER",
         help="broker to use: <address> (looked up in the local address book), <address>@host:port, "
         "host:port or :port (required)")
    parser.add_argument("-all", "--all", action="store_true", help="replay or purge every dead letter")
    flag(parser, "limit", type=int_at_least(1, DLQ_LIST_MAX), default=100, metavar="N",
         help="list: at most N dead letters (default: %(default)s)")
    flag(parser, "offset", type=int_at_least(0), default=0, metavar="N",
         help="list: skip the N oldest (default: %(default)s)")
    flag(parser, "timeout", type=float_value(positive=True), default=10.0, metavar="SECONDS",
         help="seconds to wait for the broker (default: %(default)s)")
    parser.add_argument("-json", "--json", action="store_true", help="print the broker's answer as JSON")
    parser.set_defaults(func=run, loop="asyncio", log_level="WARNING", log_file=None)


def _request(args: argparse.Namespace) -> dict[str, Any] | str:
    """The request for ``args``, or the usage error."""
    if args.action == "list":
        if args.ids or args.all:
            return "list takes no ids"
        return {"op": "list", "offset": args.offset, "limit": args.limit}
    if args.action == "show":
        if len(args.ids) != 1 or args.all:
            return "show takes one id"
        return {"op": "show", "id": args.ids[0]}
    if bool(args.ids) == bool(args.all):
        return f"{args.action} takes ids or -all"
    return {"op": args.action, "all": True} if args.all else {"op": args.action, "ids": args.ids}


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).isoformat(sep=" ", timespec="seconds") if t else "-"


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"base64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _print_answer(action: str, answer: dict[str, Any]) -> None:
    if action == "list":
        letters = answer.get("letters", [])
        for dl in letters:
            print(f"{dl['id']:>6}  {dl['route'] or '(queue)':<16} {dl['reason']:<14} attempts {dl['attempts']:<3} "
                  f"crashes {dl['crashes']:<3} nacks {dl['nacks']:<3} {_when(dl['dead_at'])}  {dl['size']} bytes  "
                  f"{dl['detail']}")
        print(f"{answer.get('total', 0)} dead letters ({len(letters)} shown; {answer.get('evicted', 0)} dropped "
              "past -dlq-max since the broker started)")
    elif action == "show":
        dl = answer["letter"]
        payload: bytes = dl.get("payload", b"")
        print(f"id:        {dl.get('id')}")
        print(f"queue:     {dl.get('route') or '(the basic queue)'}")
        print(f"reason:    {dl.get('reason')}")
        print(f"detail:    {dl.get('detail')}")
        print(f"attempts:  {dl.get('attempts')} deliveries, {dl.get('nacks')} failed (nacks), "
              f"{dl.get('crashes')} ended on the consumer's side")
        print(f"consumers: {', '.join(dl.get('consumers', [])) or '-'}")
        for text in dl.get("errors", []):
            print(f"error:     {text}")
        print(f"producer:  {dl.get('producer') or '-'} (message #{dl.get('msg_id')})")
        print(f"dead at:   {_when(dl.get('dead_at', 0.0))}")
        shown = payload[:1024].decode("utf-8", "backslashreplace")
        print(f"payload:   {len(payload)} bytes: {shown}{'...' if len(payload) > 1024 else ''}")
    elif action == "replay":
        print(f"replayed {answer.get('replayed', 0)}")
        for i, why in sorted(answer.get("failed", {}).items(), key=lambda kv: int(kv[0])):
            print(f"not replayed {i}: {why}")
    else:
        print(f"purged {answer.get('purged', 0)}")


async def run(args: argparse.Namespace) -> int:
    from teomq.client import Producer
    from teomq.errors import BrokerError, TeomqError
    from teomq.protocol import ApiCommand

    req = _request(args)
    if isinstance(req, str):
        print(f"teomq dlq: {req}", file=sys.stderr)
        return 2
    try:
        async with Producer(args.broker, name="teomq-dlq", timeout=args.timeout) as p:
            raw = await p.call_api(ApiCommand.DLQ, msgpack.packb(req))
    except BrokerError as e:
        print(f"teomq dlq: {e.reason}", file=sys.stderr)
        return 1
    except (OSError, TeomqError) as e:
        print(f"teomq dlq: cannot reach the broker {args.broker}: {e}", file=sys.stderr)
        return 1
    answer = msgpack.unpackb(raw)
    if args.json:
        print(json.dumps(_jsonable(answer), indent=2))
    else:
        _print_answer(args.action, answer)
    return 0
