"""The image's HEALTHCHECK: one GET that must answer 200 within 5 s (exit 0), else exit 1.

The URL is ``$SILOTUNE_HEALTH_URL``, else ``$PREFECT_API_URL/health`` (a worker is healthy while it
reaches its Prefect API). HTTPS is verified against ``$SILOTUNE_CA_FILE`` when set (the consortium's
CA), else the system's CAs; a health probe never disables verification.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.request


def main() -> int:
    url = os.environ.get("SILOTUNE_HEALTH_URL") or ""
    if not url and os.environ.get("PREFECT_API_URL"):
        url = os.environ["PREFECT_API_URL"].rstrip("/") + "/health"
    if not url:
        print("healthcheck: set SILOTUNE_HEALTH_URL or PREFECT_API_URL", file=sys.stderr)
        return 1
    context = ssl.create_default_context(cafile=os.environ.get("SILOTUNE_CA_FILE") or None)
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as response:
            ok = response.status == 200
    except (OSError, ValueError) as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
