"""Secrets never leave cnnbench: passwords and tokens are masked in everything it writes.

What counts as a secret: the password of any URL (``postgresql://user:PW@host/db``,
``http://user:PW@host``), token-like query parameters (``?password=…``, ``&token=…``), a libpq
``password=…`` keyword, the MLflow credentials cnnbench would send (``MLFLOW_TRACKING_PASSWORD`` /
``MLFLOW_TRACKING_TOKEN`` or ``~/.mlflow/credentials``), and the value of every environment variable
whose name says it holds one (``PGPASSWORD``, ``AWS_SECRET_ACCESS_KEY``, ``…_TOKEN``, …). A password
seen in a URL is remembered, so a later message that quotes it alone is masked too.

Where it applies: :class:`cnnbench.tracking.Tracker` masks every param, tag, artifact and experiment
note it sends; the report masks the tracking URI it names; the CLI wraps stdout and stderr
(:func:`guard_streams`), so progress lines, errors and tracebacks are masked on their way out.
"""

from __future__ import annotations

import configparser
import functools
import os
import re
import sys
from pathlib import Path
from urllib.parse import unquote

MASK = "***"
MIN_SECRET_LEN = 6  # shorter environment values ("1", "true", a one-letter key) would mask ordinary text

# scheme://user:SECRET@host — the secret runs to the last "@" before the host's "/" or a blank
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.\-]*://[^\s/:@'\"`]*):(?P<secret>[^\s/'\"`]+)@")
# password=… anywhere (a libpq DSN, a query); the looser names only as a URL's query parameter
_SECRET_PARAM = re.compile(
    r"(?P<head>(?:\b(?:password|passwd|sslpassword|access_token|auth_token|api_key|apikey)|"
    r"[?&;](?:pwd|token|secret|key|sig))\s*=\s*)(?P<secret>'[^']*'|[^\s&#'\"`]+)", re.IGNORECASE)
_SECRET_ENV_NAME = re.compile(r"PASSWORD|PASSWD|TOKEN|SECRET|_KEY$|CREDENTIAL|CONNECTION_STRING", re.IGNORECASE)

_remembered: set[str] = set()


def remember(secret: str | None) -> None:
    """Mask ``secret`` (and its percent-decoded form) wherever it appears from now on."""
    if secret and secret != MASK:
        _remembered.update({secret, unquote(secret)})


def known_secrets() -> set[str]:
    """Secrets this process holds: remembered ones, the MLflow credentials, and secret-named environment values."""
    known = set(_remembered)
    for name, value in os.environ.items():
        if _SECRET_ENV_NAME.search(name) and not value.startswith(("/", "~")):  # a path to a key file is no secret
            known.add(value)
    known.update(_mlflow_credentials())
    return {s for s in known if len(s) >= MIN_SECRET_LEN}


def _mlflow_credentials() -> set[str]:
    """The password MLflow's client sends from ``~/.mlflow/credentials`` (its environment variables are
    secret-named, so :func:`known_secrets` has them already)."""
    path = Path(os.path.expanduser("~/.mlflow/credentials"))  # where mlflow.utils.credentials reads it
    try:
        return _credentials_file(str(path), path.stat().st_mtime_ns)
    except OSError:
        return set()


@functools.lru_cache(maxsize=4)
def _credentials_file(path: str, _mtime_ns: int) -> set[str]:
    """Secret-named values of an INI credentials file (read again when it changes)."""
    parser = configparser.ConfigParser()
    try:
        parser.read(path)
    except configparser.Error:
        return set()
    return {v for section in parser.sections() for k, v in parser[section].items() if _SECRET_ENV_NAME.search(k)}


def _mask_url(match: re.Match) -> str:
    remember(match["secret"])
    return f"{match['head']}:{MASK}@"


def _mask_param(match: re.Match) -> str:
    remember(match["secret"].strip("'"))
    return f"{match['head']}{MASK}"


def text(s: str, known: set[str] | None = None) -> str:
    """``s`` with every secret masked as ``***``: URL passwords, secret query parameters, known secrets
    (``known``: :func:`known_secrets`'s set, where the caller masks many strings at once — it costs ~0.2 ms to build)."""
    if not s:
        return s
    s = _URL_PASSWORD.sub(_mask_url, s)
    s = _SECRET_PARAM.sub(_mask_param, s)
    if known is None or _remembered - known:  # a password just seen in ``s`` counts too
        known = known_secrets()
    for secret in sorted(known, key=len, reverse=True):  # longest first: one secret may contain another
        if secret in s:
            s = s.replace(secret, MASK)
    return s


def value(obj, known: set[str] | None = None):
    """``obj`` with :func:`text` applied to every string in it (dicts, lists and tuples walked); the known
    secrets are looked up once for the whole of ``obj`` (a run's 60-odd params and tags)."""
    if known is None:
        known = known_secrets()
    if isinstance(obj, str):
        return text(obj, known)
    if isinstance(obj, dict):
        return {value(k, known): value(v, known) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(value(v, known) for v in obj)
    return obj


def scan(*texts: str) -> None:
    """Remember the URL passwords in ``texts`` (e.g. the command line) before anything is written."""
    for t in texts:
        text(t)


class _RedactingStream:
    """A text stream that masks secrets in what is written to it, and is otherwise the stream it wraps."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, s: str) -> int:
        self._stream.write(text(s))
        return len(s)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name):  # flush, fileno, isatty, encoding, buffer, …
        return getattr(self._stream, name)


def guard_streams() -> None:
    """Mask secrets in everything this process prints from now on (stdout and stderr)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _RedactingStream):
            setattr(sys, name, _RedactingStream(stream))
