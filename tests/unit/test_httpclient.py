"""The shared TLS context: built once per process, and still verifying certificates as httpx does."""

from __future__ import annotations

import ssl

from opsbook.engines import httpclient


def test_clients_share_one_context_that_verifies_certificates():
    a, b = httpclient.client(timeout=1), httpclient.client(timeout=1)
    try:
        ctx = httpclient.tls_context()
        assert ctx is httpclient.tls_context()
        assert ctx.verify_mode == ssl.CERT_REQUIRED
        assert ctx.check_hostname
        assert ctx.cert_store_stats()["x509_ca"] > 0      # a CA bundle is loaded (certifi's)
        for c in (a, b):
            assert c._transport._pool._ssl_context is ctx
    finally:
        a.close()
        b.close()
