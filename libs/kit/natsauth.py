"""Who may do what on the bus: one NATS user per service, allowed only the subjects it
publishes, requests, serves and consumes (issue 8.3). Rendered into the nats-server
configuration for `postbus run` and Kubernetes; ``make run`` generates a password per service
into .run/ (0600).

The rules, per service, from the contracts in ``proto/``:
- application subjects it publishes (JetStream or core) and RPCs it calls;
- RPCs it serves and core subjects it subscribes to (``allow_responses`` lets a server
  answer the reply subject of a request it got, nothing else);
- for each stream it writes or reads: the JetStream API of that stream only (info,
  create/update, its own durable consumers and their acks) - never purge or delete;
- its KV buckets (each is a stream ``KV_<bucket>``);
- replies on its own inbox prefix ``_INBOX_<service>``: no service can read another's.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from postbus.proto.directory import DIRECTORY_AUTHENTICATE, DIRECTORY_RESOLVE, DIRECTORY_SEND_AS
from postbus.proto.mail import (
    DELIVER_LOCAL,
    DELIVER_STREAM,
    DELIVERY_EVENT,
    EVENTS_STREAM,
    INBOUND_STREAM,
    MAIL_RECEIVED,
    MAILBOX_CHANGED,
    OUTBOUND_QUEUED,
    OUTBOUND_STREAM,
)
from postbus.proto.store import STORE_BODIES, STORE_POP3_COMMIT, STORE_POP3_MAILDROP

STORE_RPCS = "store.>"
DIRECTORY_RPCS = "directory.>"

# the KV buckets each service opens (their defaults; tests/unit/test_natsauth.py checks
# them against the services' own constants and settings)
KV = {
    "smtp-ingress": ("smtp_ingress_blocklist", "smtp_ingress_load", "smtp_ingress_authfail"),
    "mime-processor": ("postbus_mime_auth",),
    "mailbox-store": ("directory-login-failures",),
    "relay": ("relay_queue", "relay_bounces"),
    "pop3-access": ("pop3-locks", "pop3-auth-failures", "pop3-login-delay"),
    "imap-access": (),
}


@dataclass(frozen=True)
class Grants:
    publish: tuple[str, ...] = ()  # application subjects (core or into a stream)
    request: tuple[str, ...] = ()  # RPC subjects it calls
    serve: tuple[str, ...] = ()  # RPC subjects it answers (queue groups)
    subscribe: tuple[str, ...] = ()  # core subjects it listens to
    streams: tuple[str, ...] = ()  # streams it creates, writes or reads
    observe: tuple[str, ...] = ()  # streams whose state (depth) it may only read
    consumers: tuple[tuple[str, str], ...] = ()  # (stream, durable) it pulls from
    kv: tuple[str, ...] = ()
    extra: dict[str, list[str]] = field(default_factory=dict)


def _subject(pattern: str) -> str:
    """A subject with {placeholders} as a NATS wildcard pattern."""
    import re

    return re.sub(r"\{[^}]+\}", "*", pattern)


GRANTS: dict[str, Grants] = {
    "smtp-ingress": Grants(
        publish=(MAIL_RECEIVED.name,),
        request=(DIRECTORY_RESOLVE.name, DIRECTORY_AUTHENTICATE.name, DIRECTORY_SEND_AS.name),
        streams=(INBOUND_STREAM.name,), kv=KV["smtp-ingress"],
        observe=(DELIVER_STREAM.name,)),  # in-flow delay: the depth of the delivery queue
    "mime-processor": Grants(
        publish=(DELIVER_LOCAL.name, OUTBOUND_QUEUED.name, _subject(DELIVERY_EVENT.name)),
        request=(DIRECTORY_RESOLVE.name,),
        streams=(INBOUND_STREAM.name, DELIVER_STREAM.name, OUTBOUND_STREAM.name,
                 EVENTS_STREAM.name),
        consumers=((INBOUND_STREAM.name, "mime-processor"),), kv=KV["mime-processor"]),
    "mailbox-store": Grants(
        publish=(_subject(DELIVERY_EVENT.name), _subject(MAILBOX_CHANGED.name)),
        serve=(STORE_RPCS, DIRECTORY_RPCS),
        streams=(DELIVER_STREAM.name, EVENTS_STREAM.name),
        consumers=((DELIVER_STREAM.name, "mailbox-store"),), kv=KV["mailbox-store"]),
    "relay": Grants(
        # bounces go back in as inbound mail (ADR 0004); a deferred job is re-queued
        publish=(_subject(DELIVERY_EVENT.name), MAIL_RECEIVED.name, OUTBOUND_QUEUED.name),
        streams=(OUTBOUND_STREAM.name, EVENTS_STREAM.name, INBOUND_STREAM.name),
        consumers=((OUTBOUND_STREAM.name, "relay"), (EVENTS_STREAM.name, "relay-bounces")),
        kv=KV["relay"]),
    "imap-access": Grants(
        request=(STORE_RPCS, DIRECTORY_AUTHENTICATE.name),
        subscribe=(_subject(MAILBOX_CHANGED.name),), kv=KV["imap-access"]),
    "pop3-access": Grants(
        request=(STORE_POP3_MAILDROP.name, STORE_POP3_COMMIT.name, STORE_BODIES.name,
                 DIRECTORY_AUTHENTICATE.name),
        kv=KV["pop3-access"]),
}


def inbox_prefix(service: str) -> str:
    return "_INBOX_" + service.replace("-", "_")


def _stream_api(stream: str) -> list[str]:
    return [f"$JS.API.STREAM.INFO.{stream}", f"$JS.API.STREAM.CREATE.{stream}",
            f"$JS.API.STREAM.UPDATE.{stream}", f"$JS.API.STREAM.MSG.GET.{stream}",
            f"$JS.API.DIRECT.GET.{stream}", f"$JS.API.DIRECT.GET.{stream}.>"]


def _consumer_api(stream: str, durable: str) -> list[str]:
    return [f"$JS.API.CONSUMER.CREATE.{stream}.{durable}",
            f"$JS.API.CONSUMER.CREATE.{stream}.{durable}.>",
            f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{durable}",
            f"$JS.API.CONSUMER.INFO.{stream}.{durable}",
            f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{durable}",
            f"$JS.ACK.{stream}.{durable}.>"]


def _kv_api(bucket: str) -> list[str]:
    stream = f"KV_{bucket}"
    # keys() and watch() use an ephemeral ordered consumer on the bucket's stream
    return [f"$KV.{bucket}.>", *_stream_api(stream), f"$JS.API.CONSUMER.CREATE.{stream}",
            f"$JS.API.CONSUMER.CREATE.{stream}.>", f"$JS.API.CONSUMER.DELETE.{stream}.>",
            f"$JS.API.CONSUMER.INFO.{stream}.>"]


def permissions(service: str) -> dict[str, object]:
    """The nats-server ``permissions`` block of one service's user."""
    g = GRANTS[service]
    pub: list[str] = [*g.publish, *g.request, "$JS.API.INFO"]
    for s in g.streams:
        pub += _stream_api(s)
    pub += [f"$JS.API.STREAM.INFO.{s}" for s in g.observe]
    for s, d in g.consumers:
        pub += _consumer_api(s, d)
    for b in g.kv:
        pub += _kv_api(b)
    sub = [f"{inbox_prefix(service)}.>", *g.serve, *g.subscribe]
    out: dict[str, object] = {"publish": {"allow": _unique(pub)},
                              "subscribe": {"allow": _unique(sub)}}
    if g.serve:
        out["allow_responses"] = True
    return out


def _unique(items: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(items))


def authorization_block(passwords: dict[str, str], *, admin_password: str | None = None) -> str:
    """The ``authorization { users = [...] }`` section of a nats-server config: one user per
    service with its permissions (and, for tests and operators, an unrestricted ``admin``)."""
    users = [{"user": name, "password": pw, "permissions": permissions(name)}
             for name, pw in passwords.items()]
    if admin_password is not None:
        users.append({"user": "admin", "password": admin_password})
    # nats-server's configuration format accepts JSON for values
    return "authorization {\n  users = " + json.dumps(users, indent=2) + "\n}\n"
