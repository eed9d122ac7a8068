"""Schemathesis hooks for scripts/schemathesis.sh: two rules of the API that
docs/openapi.json states in prose, which a generator cannot read.

1. Writes need `Content-Type: application/json`, also with an empty body
   (info.description; 415 otherwise, a guard against cross-site writes). An
   operation with no request body (cancel, issue a device key) gets no
   Content-Type from Schemathesis, so every generated call would be a 415
   and the operation itself never exercised: the header is added to writes
   that have no body. Writes with a body keep the media type generated, and
   a negative case that leaves out a header (the API key) is left alone, so
   the header stays missing (changing a case's headers makes Schemathesis
   judge it again, and it would send the key after all).
2. Run time: `wait_ms` (a long-poll or a sync submission) may be up to
   300,000 ms, and a generated value that large makes one call wait five
   minutes. A value in range above `MAX_WAIT_MS` (a number, or its digits in
   a query string) is lowered to it: the same code path (wait, then answer
   202 with the command as it stands), a shorter wait. Values out of range
   (negative, over 300,000, not numbers) are sent as generated, so their 400
   is still checked.
"""

import schemathesis
from schemathesis.core import NOT_SET

MAX_WAIT_MS = 1500
WRITES = {"POST", "PUT", "PATCH", "DELETE"}


def _shorter(value):
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return str(_shorter(int(value)))
    if isinstance(value, int) and not isinstance(value, bool) and MAX_WAIT_MS < value <= 300_000:
        return MAX_WAIT_MS
    return value


def _leaves_out_a_header(case):
    meta = case.meta
    if meta is None or not meta.generation.mode.is_negative:
        return False
    location = getattr(meta.phase.data, "parameter_location", None)
    return getattr(location, "value", location) == "header"


@schemathesis.hook
def before_call(context, case, kwargs):
    if case.method.upper() in WRITES and case.body is NOT_SET and not _leaves_out_a_header(case):
        headers = dict(case.headers or {})
        if not any(name.lower() == "content-type" for name in headers):
            headers["Content-Type"] = "application/json"
            case.headers = headers
    if isinstance(case.query, dict) and "wait_ms" in case.query:
        case.query["wait_ms"] = _shorter(case.query["wait_ms"])
    if isinstance(case.body, dict) and "wait_ms" in case.body:
        case.body["wait_ms"] = _shorter(case.body["wait_ms"])
