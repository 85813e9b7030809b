"""IMAP4rev2 (RFC 9051) against the in-memory ports, beside the transcripts
29_imap4rev2.txt and 30_searchres.txt: what a transcript cannot say (8-bit octets that are not
UTF-8, one mailbox seen from an IMAP4rev1 and an IMAP4rev2 session), and the edges of the
mode switch (ADR 0016)."""

from __future__ import annotations

import asyncio
from array import array

import imap_support

LOGIN = b"a LOGIN alice@example.test secret\r\n"
MSG = (b"From: Bob <bob@example.net>\r\nSubject: hi\r\nMIME-Version: 1.0\r\n"
       b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
       b"\r\nAAECAw==\r\n")


async def client(rev2: bool) -> imap_support.Client:
    c = imap_support.Client()
    c.out.take()
    await c.send(LOGIN)
    if rev2:
        assert await c.send(b"e ENABLE imap4rev2\r\n") == [  # any case (RFC 5161 §3.1)
            b"* ENABLED IMAP4rev2", b"e OK ENABLE completed"]
    return c


async def test_names_are_utf8_in_rev2_and_modified_utf7_in_rev1() -> None:
    rev2 = await client(True)
    out = await rev2.send('c1 CREATE "Entwürfe/a&b"\r\n'.encode()
                          + b'c2 LIST "" "Entw\xc3\xbcrfe/*"\r\n')
    assert out == [b"c1 OK CREATE completed",
                   b'* LIST (\\HasNoChildren) "/" "Entw\xc3\xbcrfe/a&b"',
                   b"c2 OK LIST completed"]
    # the same store seen by an IMAP4rev1 session: modified UTF-7 (RFC 3501 §5.1.3)
    rev1 = imap_support.Client()
    rev1.mp, rev1.acc = rev2.mp, rev2.acc
    rev1.session.directory = rev1.session.store = rev2.mp
    rev1.session.blobs = rev1.session.changes = rev2.mp
    rev1.out.take()
    await rev1.send(LOGIN)
    assert await rev1.send(b'c3 LIST "" "Entw&APw-rfe/*"\r\n') == [
        b'* LIST (\\HasNoChildren) "/" Entw&APw-rfe/a&-b', b"c3 OK LIST completed"]


async def test_a_name_that_is_not_utf8_is_bad_in_rev2() -> None:
    c = await client(True)
    out = await c.send(b'c1 CREATE "caf\xe9"\r\nc2 SELECT "caf\xe9"\r\n')
    assert out == [b"c1 BAD [CLIENTBUG] Mailbox name is not UTF-8",
                   b"c2 BAD [CLIENTBUG] Mailbox name is not UTF-8"]
    # overlong forms, UTF-16 surrogates, past U+10FFFF, 5-octet forms: none is UTF-8
    for bad in (b"\xc0\xaf", b"\xe0\x80\xaf", b"\xed\xa0\x80", b"\xed\xbf\xbf\xed\xb0\x80",
                b"\xf4\x90\x80\x80", b"\xf8\x88\x80\x80\x80", b"a\x80"):
        assert await c.send(b'c3 CREATE "%s"\r\n' % bad) == [
            b"c3 BAD [CLIENTBUG] Mailbox name is not UTF-8"]


async def test_utf8_names_are_quoted_with_escapes_or_sent_as_literals() -> None:
    c = await client(True)
    name = 'ä "q" \\'
    await c.send(b"c1 CREATE {%d+}\r\n" % len(name.encode()) + name.encode() + b"\r\n")
    out = await c.send(b'c2 LIST "" "\xc3\xa4*"\r\n')
    assert out[0] == b'* LIST (\\HasNoChildren) "/" "\xc3\xa4 \\"q\\" \\\\"'
    long = "ü" * 600  # past QUOTED_MAX octets: a literal
    await c.send(b"c3 CREATE {%d+}\r\n" % len(long.encode()) + long.encode() + b"\r\n")
    out = await c.send(b'c4 LIST "" "\xc3\xbc*"\r\n')
    assert out[0] == b'* LIST (\\HasNoChildren) "/" {1200}'


async def test_select_lists_the_mailbox_with_its_attributes() -> None:
    c = await client(True)
    out = await c.send(b"s1 SELECT Drafts\r\n")
    assert b'* LIST (\\HasNoChildren \\Drafts) "/" Drafts' in out
    assert not any(b"RECENT" in line or b"[UNSEEN" in line for line in out)


async def test_rev1_keeps_recent_lsub_and_select_without_closed() -> None:
    c = await client(False)
    c.mp.deliver(c.acc, MSG)
    out = await c.send(b"s1 SELECT INBOX\r\ns2 SELECT Drafts\r\nl1 LSUB \"\" *\r\n"
                       b"s3 STATUS INBOX (RECENT)\r\n")
    assert b"* 1 RECENT" in out and b"* OK [CLOSED] Previous mailbox closed" not in out
    assert b'* LSUB () "/" INBOX' in out and b"l1 OK LSUB completed" in out
    assert b"* STATUS INBOX (RECENT 0)" in out


async def test_rev2_is_not_qresync_expunges_stay_expunge_responses() -> None:
    c = await client(True)
    c.mp.deliver(c.acc, MSG)
    c.mp.deliver(c.acc, MSG)
    out = await c.send(b"s1 SELECT INBOX\r\nt1 STORE 1 +FLAGS.SILENT (\\Deleted)\r\n"
                       b"x1 EXPUNGE\r\n")
    assert out[-2:] == [b"* 1 EXPUNGE", b"x1 OK EXPUNGE completed"]


async def test_binary_fetch_and_literal8_append_in_rev2() -> None:
    c = await client(True)
    data = b"Subject: b\r\nContent-Transfer-Encoding: binary\r\n\r\n\x00\x01\xff\r\n"
    out = await c.send(b"p1 APPEND INBOX ~{%d+}\r\n" % len(data) + data + b"\r\n")
    assert out[-1].startswith(b"p1 OK [APPENDUID")
    out = await c.send(b"s1 SELECT INBOX\r\nf1 FETCH 1 (BINARY.PEEK[1] BINARY.SIZE[1])\r\n")
    assert b"\r\n".join(out).endswith(
        b"* 1 FETCH (BINARY[1] ~{5}\r\n\x00\x01\xff\r\n BINARY.SIZE[1] 5)\r\n"
        b"f1 OK FETCH completed")


async def test_a_bad_search_with_save_leaves_the_saved_result() -> None:
    # RFC 9051 §6.4.4.1 (RFC 5182 §2.1): a SEARCH answered BAD MUST NOT change "$"
    c = await client(True)
    c.mp.deliver(c.acc, MSG)
    out = await c.send(b"s1 SELECT INBOX\r\nq1 SEARCH RETURN (SAVE) ALL\r\n"
                       b"q2 SEARCH RETURN (SAVE) NEW\r\nq3 FETCH $ (UID)\r\n")
    assert out[-4:] == [
        b"q1 OK SEARCH completed",
        b"q2 BAD [CLIENTBUG] RECENT, NEW and OLD are not IMAP4rev2 search keys",
        b"* 1 FETCH (UID 1)", b"q3 OK FETCH completed"]


async def test_a_search_with_save_answered_no_empties_the_saved_result() -> None:
    # RFC 9051 §6.4.4.1: a SEARCH with SAVE answered NO (here BADCHARSET, which the parser
    # decides) sets "$" to the empty sequence; one without SAVE leaves it
    c = await client(True)
    c.mp.deliver(c.acc, MSG)
    out = await c.send(b"s1 SELECT INBOX\r\nq1 SEARCH RETURN (SAVE) ALL\r\n"
                       b"q2 SEARCH CHARSET KOI8-R ALL\r\nq3 FETCH $ (UID)\r\n")
    assert out[-3:] == [b"q2 NO [BADCHARSET (UTF-8 US-ASCII)] unsupported charset KOI8-R",
                        b"* 1 FETCH (UID 1)", b"q3 OK FETCH completed"]
    out = await c.send(b"q4 SEARCH RETURN (SAVE) CHARSET KOI8-R ALL\r\nq5 FETCH $ (UID)\r\n")
    assert out == [b"q4 NO [BADCHARSET (UTF-8 US-ASCII)] unsupported charset KOI8-R",
                   b"q5 OK FETCH completed"]


async def test_a_live_search_keeps_the_saved_result_it_started_with() -> None:
    c = await client(False)
    for _ in range(3):
        c.mp.deliver(c.acc, MSG)
    out = await c.send(b"s1 SELECT INBOX\r\nq1 UID SEARCH RETURN (SAVE) UID 2\r\n"
                       b"u1 UID SEARCH RETURN (UPDATE) $ UNSEEN\r\n"
                       b"q2 UID SEARCH RETURN (SAVE) UID 3\r\n"
                       b"t1 UID STORE 2,3 FLAGS (\\Seen)\r\nt2 UID STORE 2,3 FLAGS ()\r\n")
    # the update follows message 2 (the "$" of its start), never 3
    updates = [line for line in out if line.startswith(b'* ESEARCH (TAG "u1")')]
    assert updates == [b'* ESEARCH (TAG "u1") UID',
                       b'* ESEARCH (TAG "u1") UID REMOVEFROM (0 2)',
                       b'* ESEARCH (TAG "u1") UID ADDTO (0 2)']


async def test_save_with_partial_keeps_the_range_unless_count_asks_for_all() -> None:
    c = await client(False)
    for _ in range(4):
        c.mp.deliver(c.acc, MSG)
    out = await c.send(b"s1 SELECT INBOX\r\nq1 SEARCH RETURN (SAVE PARTIAL 2:3) ALL\r\n"
                       b"f1 FETCH $ (UID)\r\n")
    assert b'* ESEARCH (TAG "q1") PARTIAL (2:3 2:3)' in out
    assert [x for x in out if b"FETCH (UID" in x] == [b"* 2 FETCH (UID 2)", b"* 3 FETCH (UID 3)"]
    out = await c.send(b"q2 SEARCH RETURN (SAVE COUNT PARTIAL 1:1) ALL\r\nf2 FETCH $ (UID)\r\n")
    assert [x for x in out if b"FETCH (UID" in x] == [
        b"* %d FETCH (UID %d)" % (n, n) for n in range(1, 5)]


async def test_the_saved_result_is_kept_as_uid_ranges() -> None:
    # a saved result of millions of UIDs must not cost a Python int (or a tuple) each for
    # the rest of the session: "$" is held as ascending UID ranges, first and last flat in
    # 32-bit words, 8 octets a run of saved messages
    c = await client(True)
    for _ in range(6):
        c.mp.deliver(c.acc, MSG)
    out = await c.send(b"s1 SELECT INBOX\r\nq1 UID SEARCH RETURN (SAVE) NOT UID 4\r\n"
                       b"t1 UID STORE 2 +FLAGS.SILENT (\\Deleted)\r\nx1 EXPUNGE\r\n"
                       b"f1 UID FETCH $ (FLAGS)\r\nq2 SEARCH $\r\n")
    assert c.session._saved == array("I", [1, 3, 5, 6])
    assert [x for x in out if b"FETCH (" in x] == [
        b"* 1 FETCH (UID 1 FLAGS ())", b"* 2 FETCH (UID 3 FLAGS ())",
        b"* 4 FETCH (UID 5 FLAGS ())", b"* 5 FETCH (UID 6 FLAGS ())"]
    assert b'* ESEARCH (TAG "q2") ALL 1:2,4:5' in out


async def test_names_with_control_characters_or_line_separators_are_refused() -> None:
    # RFC 9051 §5.1: names MUST NOT contain U+0000-U+001F, U+007F, U+0080-U+009F, U+2028
    # or U+2029, however they reach the server (UTF-8 in rev2, modified UTF-7 in rev1)
    c = await client(True)
    out = await c.send(b'c1 CREATE "a\xc2\x85b"\r\nc2 CREATE "x\xe2\x80\xa8"\r\n'
                       b'c3 CREATE "y\xe2\x80\xa9/z"\r\nc4 CREATE "ok\xc2\xa0"\r\n'
                       b'r1 RENAME Junk "J\xc2\x9f"\r\nl1 LIST "" "*"\r\n')
    refused = b"NO [CANNOT] Mailbox name contains a control character or line separator"
    assert out[:5] == [b"c1 " + refused, b"c2 " + refused, b"c3 " + refused,
                       b"c4 OK CREATE completed", b"r1 " + refused]
    assert not any(b"\xc2\x85" in x or b"\xe2\x80" in x or b"\xc2\x9f" in x for x in out)
    rev1 = await client(False)
    assert await rev1.send(b"c5 CREATE a&AIU-b\r\nc6 CREATE &ICg-\r\n") == [
        b"c5 " + refused, b"c6 " + refused]


async def test_partial_fetch_offsets_and_lengths_are_63_bit() -> None:
    # RFC 9051 §9: partial = "<" number64 "." nz-number64 ">" (Appendix D: 63-bit sizes);
    # a rev2 client may ask for "the rest" with a length past 2^32 - 1
    c = await client(True)
    c.mp.deliver(c.acc, MSG)
    out = await c.send(b"s1 SELECT INBOX\r\nf1 FETCH 1 (BODY.PEEK[]<0.5000000000>)\r\n"
                       b"f2 FETCH 1 (BINARY.PEEK[]<5000000000.9223372036854775807>)\r\n"
                       b"f3 FETCH 1 (BODY.PEEK[]<0.9223372036854775808>)\r\n")
    text = b"\r\n".join(out)
    assert b"* 1 FETCH (BODY[]<0> {%d}\r\n" % len(MSG) + MSG + b")" in text
    assert b"* 1 FETCH (BINARY[]<5000000000> {0}\r\n)" in text
    assert out[-1] == b"f3 BAD [CLIENTBUG] number out of range"


async def test_a_select_refused_as_bad_keeps_the_mailbox_and_the_saved_result() -> None:
    # a name that is not UTF-8 makes SELECT BAD: the command is not carried out, so the
    # selected mailbox stays (no [CLOSED]) and so does "$" (RFC 9051 §6.4.4.1 resets it
    # on a SELECT's tagged OK only)
    c = await client(True)
    c.mp.deliver(c.acc, MSG)
    out = await c.send(b"s1 SELECT INBOX\r\nq1 SEARCH RETURN (SAVE) ALL\r\n"
                       b's2 SELECT "caf\xe9"\r\nf1 FETCH $ (UID)\r\n')
    assert out[-4:] == [b"q1 OK SEARCH completed",
                        b"s2 BAD [CLIENTBUG] Mailbox name is not UTF-8",
                        b"* 1 FETCH (UID 1)", b"f1 OK FETCH completed"]


async def test_rev2_claims_recent_as_rev1_does_without_showing_it() -> None:
    # ADR 0016: a rev2 SELECT takes \Recent in the store (RFC 3501 §2.3.2: the first
    # session told of a message), so a rev1 session after it sees none, as after a rev1 one;
    # EXAMINE in rev2 takes nothing
    rev2 = await client(True)
    for _ in range(2):
        rev2.mp.deliver(rev2.acc, MSG)
    rev1 = imap_support.Client()
    rev1.mp, rev1.acc = rev2.mp, rev2.acc
    rev1.session.directory = rev1.session.store = rev2.mp
    rev1.session.blobs = rev1.session.changes = rev2.mp
    rev1.out.take()
    await rev1.send(LOGIN)
    assert b"* 2 RECENT" in await rev1.send(b"x1 EXAMINE INBOX\r\n")
    out = await rev2.send(b"x2 EXAMINE INBOX\r\n")
    assert not any(b"RECENT" in x for x in out)
    assert b"* 2 RECENT" in await rev1.send(b"x3 EXAMINE INBOX\r\n")
    await rev2.send(b"s1 SELECT INBOX\r\n")
    assert b"* 0 RECENT" in await rev1.send(b"s2 SELECT INBOX\r\n")


async def test_a_subscription_to_a_forbidden_name_is_refused_and_can_be_dropped() -> None:
    # SUBSCRIBE puts a name in the list LIST (SUBSCRIBED) shows even without a mailbox
    # (RFC 9051 §6.3.7): the characters §5.1 forbids are refused there too (the store
    # refused C0 already); UNSUBSCRIBE takes any name, to drop one made before
    c = await client(True)
    refused = b"NO [CANNOT] Mailbox name contains a control character or line separator"
    out = await c.send(b'b1 SUBSCRIBE "a\xc2\x85"\r\nb2 SUBSCRIBE "b\xe2\x80\xa8"\r\n'
                       b'b3 UNSUBSCRIBE "a\xc2\x85"\r\nl1 LIST (SUBSCRIBED) "" "*"\r\n')
    assert out[:3] == [b"b1 " + refused, b"b2 " + refused, b"b3 OK UNSUBSCRIBE completed"]
    assert not any(b"\\NonExistent" in x for x in out)


async def test_a_live_search_over_a_large_saved_result_counts_its_ranges() -> None:
    # SEARCH RETURN (UPDATE) $ keeps "$" as UID ranges in its program for as long as it
    # lives: they count against the UIDs a session's live searches may hold, as its result
    # does, or ten live searches could each keep a copy of a huge "$" (RFC 5267 §4.3:
    # NO [NOUPDATE] when the server will not keep one)
    c = imap_support.Client(search_update_uids_max=10)
    c.out.take()
    await c.send(LOGIN)
    for _ in range(30):
        c.mp.deliver(c.acc, MSG)
    odd = b",".join(b"%d" % n for n in range(1, 30, 2))  # 15 ranges
    out = await c.send(b"s1 SELECT INBOX\r\nq1 SEARCH RETURN (SAVE) " + odd + b"\r\n"
                       b"u1 SEARCH RETURN (UPDATE) $ FLAGGED\r\n"
                       b"u2 SEARCH RETURN (UPDATE) 1:5 FLAGGED\r\n")
    assert b'* NO [NOUPDATE "u1"] Too many search updates' in out
    assert not any(b'NOUPDATE "u2"' in x for x in out)


async def test_dollar_with_nothing_saved_names_no_message() -> None:
    # RFC 9051 §6.4.4.1: "$" before any SEARCH with SAVE (or after SELECT reset it) is the
    # empty sequence, valid but matching nothing: no command touches a message through it
    c = await client(True)
    for _ in range(2):
        c.mp.deliver(c.acc, MSG)
    out = await c.send(b"s1 SELECT INBOX\r\nt0 STORE 1:2 +FLAGS.SILENT (\\Deleted)\r\n"
                       b"f1 FETCH $ (UID)\r\nt1 STORE $ +FLAGS (\\Seen)\r\n"
                       b"c1 COPY $ Trash\r\nm1 MOVE $ Trash\r\nx1 UID EXPUNGE $\r\n"
                       b"q1 SEARCH $\r\nq2 UID SEARCH NOT UID $\r\n")
    assert not any(b"FETCH (" in x or b"EXPUNGE" == x[-7:] for x in out)
    assert b'* ESEARCH (TAG "q1")' in out and b'* ESEARCH (TAG "q2") UID ALL 1:2' in out
    assert b"* STATUS Trash (MESSAGES 0)" in await c.send(b"s2 STATUS Trash (MESSAGES)\r\n")


async def test_list_wildcards_do_not_backtrack() -> None:
    # a pattern of many "*" or "%" against a long name the client made itself: a
    # backtracking regex took seconds (minutes, with a few more stars) in the event loop,
    # stalling every session of the process; matching is linear in the name's length
    c = await client(True)
    name = b"a" * 150
    await c.send(b"c1 CREATE " + name + b"\r\n")
    # a liveness bound, not a speed target: with seven stars a backtracking matcher
    # would not finish within hours, the linear one takes milliseconds
    out = await asyncio.wait_for(c.send(
        b'l1 LIST "" "*a*a*a*a*a*a*ab"\r\nl2 LIST "" "%a%a%a%a%a%a%ab"\r\n'
        b'l3 LIST "" "*a*a*a*a*a"\r\nl4 LIST "" "%a%%a*%a"\r\n'
        b'l5 LIST "" "inBOX"\r\nl6 LIST "" "*/%"\r\n'), timeout=60)
    listed = [x for x in out if x.startswith(b"* LIST")]
    assert listed == [b'* LIST (\\HasNoChildren) "/" ' + name] * 2 + [
        b'* LIST (\\HasNoChildren) "/" INBOX']
