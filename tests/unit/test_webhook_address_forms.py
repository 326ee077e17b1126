"""Where webhooks may go: an IPv6 address that carries an IPv4 one (mapped, translated,
compatible, NAT64, 6to4, Teredo) is judged as the IPv4 address it reaches, and the service's
own port on an address of this host is the service itself."""

from __future__ import annotations

import pytest

from orchestra.webhooks import is_own, is_public

#: IPv6 forms of loopback, of the cloud metadata address 169.254.169.254 and of private
#: addresses: each reaches the IPv4 address it carries.
HIDDEN_PRIVATE = [
    "64:ff9b::7f00:1",  # NAT64 (RFC 6052) of 127.0.0.1
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
    "64:ff9b:1::a9fe:a9fe",  # local-use NAT64 (RFC 8215)
    "64:ff9b:1::808:808",  # local-use NAT64 is not global, whatever it carries
    "2002:7f00:1::",  # 6to4 of 127.0.0.1
    "2002:a9fe:a9fe::",  # 6to4 of 169.254.169.254
    "2002:c0a8:101::1",  # 6to4 of 192.168.1.1
    "::7f00:1",  # IPv4-compatible 127.0.0.1
    "::a9fe:a9fe",  # IPv4-compatible 169.254.169.254
    "::ffff:0:7f00:1",  # IPv4-translated 127.0.0.1
    "::ffff:0:a9fe:a9fe",  # IPv4-translated 169.254.169.254
    "::ffff:127.0.0.1",  # IPv4-mapped
    "::ffff:169.254.169.254",
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # Teredo
    "2001::",  # Teredo with no server
    "fec0::1",  # site-local (deprecated, still routed privately)
]


@pytest.mark.parametrize("address", HIDDEN_PRIVATE)
def test_an_ipv6_form_of_a_private_ipv4_address_is_not_public(address: str) -> None:
    assert not is_public(address)


@pytest.mark.parametrize(
    "address",
    [
        "64:ff9b::808:808",  # NAT64 of 8.8.8.8
        "2002:808:808::1",  # 6to4 of 8.8.8.8
        "::ffff:8.8.8.8",
        "2606:4700::1111",
        "93.184.216.34",
    ],
)
def test_an_ipv6_form_of_a_public_ipv4_address_stays_public(address: str) -> None:
    assert is_public(address)


def test_the_services_own_port_on_loopback_is_the_service_itself() -> None:
    own = ("127.0.0.1", 8000)
    assert is_own(["127.0.0.1"], 8000, own)
    assert is_own(["::1", "127.0.0.1"], 8000, own)  # "localhost"
    assert is_own(["::ffff:127.0.0.1"], 8000, own)
    assert is_own(["0.0.0.0"], 8000, own)  # a connection to 0.0.0.0 reaches this host
    assert not is_own(["127.0.0.1"], 8001, own)  # another port: a receiver beside it
    assert not is_own(["93.184.216.34"], 8000, own)  # another host
    assert not is_own(["127.0.0.1"], 8000, None)  # not known
    assert not is_own(["127.0.0.1"], 0, ("127.0.0.1", 0))


def test_a_service_on_every_address_is_reached_on_any_address_of_this_host() -> None:
    for host in ("0.0.0.0", "::", "localhost"):
        own = (host, 8000)
        assert is_own(["127.0.0.1"], 8000, own), host
        assert is_own(["127.0.0.5"], 8000, own), host  # all of 127/8 is this host's
        assert not is_own(["93.184.216.34"], 8000, own), host


def test_a_service_on_one_address_is_reached_on_that_one() -> None:
    own = ("192.0.2.10", 8000)
    assert is_own(["192.0.2.10"], 8000, own)
    assert not is_own(["192.0.2.11"], 8000, own)
    assert not is_own(["127.0.0.1"], 8000, own)
