"""Addresses and untrusted bytes as one safe line of text."""

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress

from twistsock._format import describe, isIPv6Literal, printable


def test_printable_keeps_utf8_and_escapes_the_rest():
    assert printable("café".encode()) == "café"
    assert printable(b"a\nb\r\tc\x00\x7f") == "a\\nb\\r\\tc\\x00\\x7f"
    assert printable(b"\xff\xfe") == "\\xff\\xfe"
    assert printable("\u2028\u0085".encode()) == "\\u2028\\x85"


def test_printable_escapes_a_literal_backslash_so_escapes_are_unambiguous():
    assert printable(b"\\xff") == "\\\\xff"
    assert printable(b"\\xff") != printable(b"\xff")


def test_printable_limits_length():
    text = printable(b"a" * 5000, limit=10)
    assert text == "a" * 10 + "... [4990 more bytes]"


def test_describe_addresses():
    assert describe(IPv4Address("TCP", "127.0.0.1", 5000)) == "127.0.0.1:5000"
    assert describe(IPv6Address("TCP", "::1", 5000)) == "[::1]:5000"
    assert describe(IPv6Address("TCP", "::ffff:127.0.0.1", 5000)) == "127.0.0.1:5000"
    assert describe(UNIXAddress(b"/tmp/s.sock")) == "unix:/tmp/s.sock"
    assert describe(UNIXAddress(None)) == "unix:(unnamed)"


def test_ipv6_literal():
    assert isIPv6Literal("::1")
    assert isIPv6Literal("fe80::1")
    assert not isIPv6Literal("127.0.0.1")
    assert not isIPv6Literal("tcp:127.0.0.1:5000")


def test_invisible_characters_that_reorder_or_hide_text_are_escaped():
    from twistsock._format import oneLine

    hostile = "ack \u202eevil\u2066x\u200by\ufeffz"
    assert printable(hostile.encode()) == "ack \\u202eevil\\u2066x\\u200by\\ufeffz"
    assert oneLine(hostile) == "ack \\u202eevil\\u2066x\\u200by\\ufeffz"
    assert oneLine("café ünïcode") == "café ünïcode"  # ordinary letters stay
