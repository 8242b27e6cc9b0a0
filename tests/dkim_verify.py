#!/usr/bin/python3
"""Verify every DKIM-Signature of the message on standard input with dkimpy.

Public keys come from the DNS server given with --dns HOST:PORT (the tests'
own server), never from the system resolver. Prints one line per signature
and exits with 0 only when there is at least one signature and all verify.
"""

import argparse
import sys

import dkim
import dns.resolver


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dns", required=True, help="DNS server as HOST:PORT")
    args = parser.parse_args()
    host, port = args.dns.rsplit(":", 1)

    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = [host]
    resolver.port = int(port)
    resolver.lifetime = 5

    def txt_lookup(name, timeout=5):
        if isinstance(name, bytes):
            name = name.decode()
        try:
            answer = resolver.resolve(name, "TXT")
        except Exception as error:
            print(f"lookup {name} failed: {error}", file=sys.stderr)
            return None
        for record in answer:
            return b"".join(record.strings)
        return None

    message = sys.stdin.buffer.read()
    verifier = dkim.DKIM(message)
    signatures = [value for name, value in verifier.headers if name.lower() == b"dkim-signature"]
    if not signatures:
        print("no DKIM-Signature header")
        return 1
    failures = 0
    for index, value in enumerate(signatures):
        tags = dict(
            part.strip().split(b"=", 1)
            for part in value.split(b";")
            if b"=" in part
        )
        ok = verifier.verify(idx=index, dnsfunc=txt_lookup)
        domain = tags.get(b"d", b"?").decode()
        selector = tags.get(b"s", b"?").decode()
        algorithm = tags.get(b"a", b"?").decode()
        print(f"signature {index}: d={domain} s={selector} a={algorithm}: {'pass' if ok else 'FAIL'}")
        if not ok:
            failures += 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
