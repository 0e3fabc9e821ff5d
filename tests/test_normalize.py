"""3PID canonical forms and the lookup hash."""

from __future__ import annotations

import pytest

from indexer import normalize
from indexer.normalize import InvalidAddress


@pytest.mark.parametrize(
    "raw, canonical",
    [
        ("  Alice@Example.COM ", "alice@example.com"),
        ("Strauß@example.org", "strauss@example.org"),
        ("user@BÜCHER.example", "user@bücher.example"),
        ("user@xn--bcher-kva.example", "user@bücher.example"),
        ("john@localhost", "john@localhost"),
    ],
)
def test_email_canonical_form(raw, canonical):
    assert normalize.email(raw) == canonical


@pytest.mark.parametrize("raw", ["", "no-at-sign", "@example.org", "alice@", "Alice <alice@example.org>",
                                 "a b@example.org", "alice@exa mple.org", "alice@-bad-.org"])
def test_invalid_emails(raw):
    with pytest.raises(InvalidAddress):
        normalize.email(raw)


def test_punycode_domains_are_found_by_either_form():
    assert normalize.lookup_forms("email", "user@bücher.example") == [
        "user@bücher.example", "user@xn--bcher-kva.example"]
    assert normalize.lookup_forms("email", "user@example.org") == ["user@example.org"]


@pytest.mark.parametrize(
    "raw, region, canonical",
    [
        ("+44 7700 900123", None, "447700900123"),
        ("07700 900123", "GB", "447700900123"),
        ("(202) 555-0143", "US", "12025550143"),
        ("0033 6 12 34 56 78", "GB", "33612345678"),
    ],
)
def test_msisdn_canonical_form(raw, region, canonical):
    assert normalize.msisdn(raw, region) == canonical


@pytest.mark.parametrize("raw, region", [("07700 900123", None), ("call me", "GB"), ("+44 12", None)])
def test_invalid_msisdn(raw, region):
    with pytest.raises(InvalidAddress):
        normalize.msisdn(raw, region)


def test_mxid_and_localpart():
    assert normalize.mxid("@Alice:Example.org") == ("@alice:example.org", "alice")
    assert normalize.localpart(" Bob ") == "bob"
    with pytest.raises(InvalidAddress):
        normalize.localpart("bob smith")
    with pytest.raises(InvalidAddress):
        normalize.mxid("alice:example.org")


def test_other_media_keep_their_address():
    assert normalize.threepid("Jabber", " alice@chat.example ", None) == ("jabber", "alice@chat.example")
    with pytest.raises(InvalidAddress):
        normalize.threepid("bad medium!", "x", None)


@pytest.mark.parametrize(
    "address, medium, digest",
    [
        ("alice@example.com", "email", "4kenr7N9drpCJ4AfalmlGQVsOn3o2RHjkADUpXJWZUc"),
        ("bob@example.com", "email", "LJwSazmv46n0hlMlsb_iYxI0_HXEqy_yj6Jm636cdT8"),
        ("18005552067", "msisdn", "nlo35_T5fzSGZzJApqu8lgIudJvmOQtDaHtr-I4rU7I"),
    ],
)
def test_spec_lookup_hash_vectors(address, medium, digest):
    assert normalize.lookup_hash(address, medium, "matrixrocks") == digest


def test_query_address_falls_back_to_what_was_sent():
    assert normalize.query_address("email", "Bob@Example.com") == "bob@example.com"
    assert normalize.query_address("msisdn", "447700900123") == "447700900123"
    assert normalize.query_address("email", "not an address") == "not an address"
