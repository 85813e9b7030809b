"""NOTIFY (RFC 5465): which events a session asked for in which mailbox, and the STATUS
response a change in a mailbox other than the selected one earns. Pure: the parsed command
in, decisions out; the session keeps the state and does the I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from postbus.protocols.imap_parser import FetchAtt, Notify, NotifyGroup

SUPPORTED = ("MessageNew", "MessageExpunge", "FlagChange")
NEW, EXPUNGE, FLAGS = SUPPORTED


def unsupported(cmd: Notify) -> list[str]:
    """The events of a NOTIFY SET this server cannot report (answered NO [BADEVENT])."""
    return sorted({e for g in cmd.groups or () for e in g.events if e not in SUPPORTED})


def mailbox_names(cmd: Notify) -> int:
    return sum(len(g.mailboxes) for g in cmd.groups or ())


@dataclass(frozen=True)
class Filter:
    """A NOTIFY SET's event groups, mailbox names decoded (``names`` the store's names, in
    the groups' order). ``selected`` is the group for the selected mailbox, if any."""

    groups: tuple[tuple[NotifyGroup, tuple[str, ...]], ...]
    selected: NotifyGroup | None

    @classmethod
    def of(cls, cmd: Notify, names: list[tuple[str, ...]]) -> Filter:
        assert cmd.groups is not None
        sel = next((g for g in cmd.groups if g.filter.startswith("selected")), None)
        others = tuple((g, n) for g, n in zip(cmd.groups, names, strict=True)
                       if not g.filter.startswith("selected"))
        return cls(others, sel)

    def events_for(self, name: str, subscribed: frozenset[str] | set[str]) -> tuple[str, ...]:
        """The events wanted from a mailbox other than the selected one: those of the first
        group whose filter names it (RFC 5465 §6; Dovecot takes the first too). ``inboxes``
        is the INBOX, the only mailbox delivery files into here."""
        for g, names in self.groups:
            f = g.filter
            if (f == "personal" or (f == "inboxes" and name == "INBOX")
                    or (f == "subscribed" and name in subscribed)
                    or (f == "mailboxes" and name in names)
                    or (f == "subtree" and any(name == n or name.startswith(n + "/")
                                               for n in names))):
                return g.events
        return ()

    @property
    def uses_subscriptions(self) -> bool:
        return any(g.filter == "subscribed" for g, _ in self.groups)

    @property
    def selected_events(self) -> tuple[str, ...]:
        return self.selected.events if self.selected is not None else ()

    @property
    def selected_immediate(self) -> bool:
        """``selected``: expunges may go out as soon as they happen; ``selected-delayed``
        keeps them for a command after which EXPUNGE may be sent (RFC 5465 §6.1)."""
        return self.selected is not None and self.selected.filter == "selected"

    @property
    def new_message_atts(self) -> tuple[FetchAtt, ...]:
        return self.selected.fetch_atts if self.selected is not None else ()


def status_items(events: tuple[str, ...], *, added: bool, expunged: bool, flags: bool,
                 initial: bool = False) -> tuple[str, ...]:
    """The STATUS items a change earns (RFC 5465 §5.1-§5.3, as Dovecot answers): messages
    arriving or leaving give MESSAGES, UIDNEXT and UIDVALIDITY; a flag change gives
    HIGHESTMODSEQ (and UIDVALIDITY, which qualifies it). Nothing when the events asked for
    do not cover the change. ``initial``: NOTIFY SET STATUS, every item the events ask for.
    """
    items: list[str] = []
    if NEW in events and (added or expunged or initial):
        items += ["MESSAGES", "UIDNEXT", "UIDVALIDITY"]
        if initial:
            items.append("UNSEEN")
    if FLAGS in events and (flags or initial):
        items += [x for x in ("UIDVALIDITY", "HIGHESTMODSEQ") if x not in items]
    return tuple(items)
