"""Address and domain normalization: any text either normalizes or raises Invalid."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from postbus.kit.testing import examples
from postbus.mailbox_store.directory import Invalid, normalize_domain, split_address


@settings(max_examples=examples(500), deadline=None)
@given(st.text(max_size=80))
def test_split_address_never_raises_anything_else(text: str) -> None:
    try:
        local, domain = split_address(text)
    except Invalid:
        return
    assert local and domain == domain.lower() and domain.isascii()
    assert split_address(f"{local}@{domain}") == (local, domain)  # idempotent


@settings(max_examples=examples(300), deadline=None)
@given(st.from_regex(r"[A-Za-z0-9\u00e0-\u00ff-]{1,20}(\.[A-Za-z0-9\u00e0-\u00ff-]{1,20}){1,3}",
                     fullmatch=True))
def test_normalize_domain_is_idempotent(name: str) -> None:
    try:
        a = normalize_domain(name)
    except Invalid:
        return
    assert normalize_domain(a) == a and normalize_domain(name.upper()) == a
