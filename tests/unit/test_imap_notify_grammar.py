"""NOTIFY's grammar and rules (RFC 5465 §5, §6.1, §8) and which events and STATUS items a
change in another mailbox earns (postbus.protocols.imap_notify)."""

from __future__ import annotations

import pytest

from postbus.protocols import imap_notify as n
from postbus.protocols import imap_parser as p


def parse(line: bytes) -> p.Notify:
    cmd = p.parse_command(line)
    assert isinstance(cmd, p.Notify), cmd
    return cmd


def test_rfc_5465_examples_parse() -> None:
    # §7: a client that wants new mail in every mailbox, and its selected mailbox at once
    cmd = parse(b"A3 NOTIFY SET (selected (MessageNew (UID BODY.PEEK[HEADER.FIELDS (From "
                b"Subject)]) MessageExpunge)) (subtree Lists (MessageNew MessageExpunge))")
    assert cmd.groups is not None and not cmd.status
    sel, lists = cmd.groups
    assert (sel.filter, sel.events) == ("selected", ("MessageNew", "MessageExpunge"))
    assert [a.name for a in sel.fetch_atts] == ["UID", "BODY[]"]
    assert (lists.filter, lists.mailboxes) == ("subtree", (b"Lists",))
    cmd = parse(b'a NOTIFY SET STATUS (mailboxes (INBOX "My Box") (messagenew MESSAGEEXPUNGE'
                b" flagchange)) (personal NONE)")
    assert cmd.status and cmd.groups is not None
    assert cmd.groups[0].events == ("MessageNew", "MessageExpunge", "FlagChange")
    assert cmd.groups[0].mailboxes == (b"INBOX", b"My Box")
    assert cmd.groups[1].events == ()
    assert parse(b"a NOTIFY NONE").groups is None


@pytest.mark.parametrize("line", [
    b"a NOTIFY SET (personal (MessageNew))",              # §5: with MessageExpunge only
    b"a NOTIFY SET (personal (MessageExpunge))",
    b"a NOTIFY SET (personal (FlagChange))",              # §5: needs both
    b"a NOTIFY SET (selected NONE) (selected-delayed NONE)",  # §6.1: one selected filter
    b"a NOTIFY SET (selected (MessageNew MessageExpunge MailboxName))",
    b"a NOTIFY SET (personal (MessageNew (UID) MessageExpunge))",  # fetch-att: selected only
    b"a NOTIFY SET STATUS",
    b"a NOTIFY SET",
    b"a NOTIFY SET (personal ())",
    b"a NOTIFY SET (mailboxes () (MessageNew MessageExpunge))",
    b"a NOTIFY SET (elsewhere (MessageNew MessageExpunge))",
    b"a NOTIFY SET (personal (MessageNew MessageNew MessageExpunge))",
    b"a NOTIFY NONE STATUS",
    b"a NOTIFY",
])
def test_bad_requests_are_bad(line: bytes) -> None:
    assert isinstance(p.parse_command(line), p.Bad)


def test_too_many_names_are_bad_before_they_cost_anything() -> None:
    names = b" ".join(b"m%d" % i for i in range(p.MAX_NOTIFY_NAMES + 1))
    bad = p.parse_command(b"a NOTIFY SET (mailboxes (" + names + b") (MessageNew MessageExpunge))")
    assert isinstance(bad, p.Bad)


def test_unsupported_events_are_named() -> None:
    cmd = parse(b"a NOTIFY SET (inboxes (MessageNew MessageExpunge AnnotationChange)) "
                b"(personal (MailboxName SubscriptionChange XFuture))")
    assert n.unsupported(cmd) == ["AnnotationChange", "MailboxName", "SubscriptionChange",
                                  "XFuture"]


def test_the_first_group_that_names_a_mailbox_decides() -> None:
    cmd = parse(b"a NOTIFY SET (selected (MessageNew MessageExpunge)) (mailboxes Junk NONE) "
                b"(subtree Lists (MessageNew MessageExpunge FlagChange)) "
                b"(subscribed (MessageNew MessageExpunge)) (inboxes (MessageNew MessageExpunge))")
    assert cmd.groups is not None
    f = n.Filter.of(cmd, [tuple(x.decode() for x in g.mailboxes) for g in cmd.groups])
    subscribed = {"Archive"}
    assert f.events_for("Junk", subscribed) == ()
    assert f.events_for("Lists", subscribed) == ("MessageNew", "MessageExpunge", "FlagChange")
    assert f.events_for("Lists/ietf", subscribed)[-1] == "FlagChange"
    assert f.events_for("Listsx", subscribed) == ()
    assert f.events_for("Archive", subscribed) == ("MessageNew", "MessageExpunge")
    assert f.events_for("INBOX", subscribed) == ("MessageNew", "MessageExpunge")
    assert f.events_for("Drafts", subscribed) == ()
    assert f.selected_immediate and f.selected_events == ("MessageNew", "MessageExpunge")
    assert f.uses_subscriptions


def test_status_items_follow_the_events_and_the_change() -> None:
    new_exp = ("MessageNew", "MessageExpunge")
    every = (*new_exp, "FlagChange")
    assert n.status_items(new_exp, added=True, expunged=False, flags=False) == (
        "MESSAGES", "UIDNEXT", "UIDVALIDITY")
    assert n.status_items(new_exp, added=False, expunged=False, flags=True) == ()
    assert n.status_items(every, added=False, expunged=False, flags=True) == (
        "UIDVALIDITY", "HIGHESTMODSEQ")
    assert n.status_items(every, added=False, expunged=True, flags=True) == (
        "MESSAGES", "UIDNEXT", "UIDVALIDITY", "HIGHESTMODSEQ")
    assert n.status_items((), added=True, expunged=True, flags=True) == ()
    assert n.status_items(every, added=False, expunged=False, flags=False, initial=True) == (
        "MESSAGES", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "HIGHESTMODSEQ")
