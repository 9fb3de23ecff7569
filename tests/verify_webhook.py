"""Verifies one webhook request with the Standard Webhooks reference library.

Reads {"secret", "headers", "body"} as JSON on stdin; exits 0 if the signature verifies,
1 with the library's error on stderr if not. Called by tests/it/push/webhooks.rs.
"""

import json
import sys

from standardwebhooks.webhooks import Webhook


def main() -> int:
    given = json.load(sys.stdin)
    try:
        Webhook(given["secret"]).verify(given["body"], given["headers"])
    except Exception as e:  # the library raises WebhookVerificationError, or a parse error
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
