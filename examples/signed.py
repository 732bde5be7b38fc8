"""Signs a message with a key that arrives as a sealed secret (the environment variable
SIGNING_KEY): the key is in no public record, only in this bundle's environment while it runs.

    atrund bundle publish examples/signed.py --runtime python --secret SIGNING_KEY --runner did:plc:RUNNER
    atrund invoke at://…/dev.atrun.bundle/… --runner did:plc:RUNNER --endpoint sign --args '{"message": "hi"}' --wait
"""

import hashlib
import hmac
import os


def sign(args):
    message = str(args.get("message", ""))
    key = os.environ["SIGNING_KEY"].encode()
    return {"message": message, "hmacSha256": hmac.new(key, message.encode(), hashlib.sha256).hexdigest()}
