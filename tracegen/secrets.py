"""Secrets never reach logs or files. The API key's value and the credentials a base_url carries (`user:pass@`,
and query parameters such as `?api_key=`) are replaced by *** in every error text, log line and file the
stages write, including the text of a server that echoes them back.

    redact = Redactor(cfg.secrets())      # EngineConfig.secrets(): the key, URL credentials, vLLM's --api-key
    redact("HTTP 500: bad key sk-123")    # -> "HTTP 500: bad key ***"
    public_url("http://u:p@host/v1?api_key=k&v=1")  # -> "http://***@host/v1?api_key=***&v=1"
"""

import base64
import re
import urllib.parse

MASK = "***"
# Query parameters whose values are credentials (api_key, access_token, sig, X-Auth...); others stay readable.
SENSITIVE = re.compile(r"key|token|secret|pass|pwd|sig|auth|cred", re.IGNORECASE)
MIN_LENGTH = 4  # shorter values would mask ordinary words everywhere; no real credential is that short


def url_secrets(url: str) -> list[str]:
    """The credentials inside a URL: its user and password (also as the Basic authorization header httpx makes
    of them, which a server may echo), and the values of sensitive query parameters."""
    parts = urllib.parse.urlsplit(url)
    query = [v for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True) if SENSITIVE.search(k)]
    user, password = (urllib.parse.unquote(s) if s else "" for s in (parts.username, parts.password))
    basic = base64.b64encode(f"{user}:{password}".encode()).decode() if user or password else ""
    return [s for s in (user, password, basic, *query) if s]


def public_url(url: str) -> str:
    """The URL as it may be shown: user info and sensitive query values replaced by ***, the rest as it was."""
    parts = urllib.parse.urlsplit(url)
    netloc = parts.netloc if "@" not in parts.netloc else f"{MASK}@{parts.netloc.rsplit('@', 1)[1]}"
    query = "&".join(f"{k}={MASK}" if SENSITIVE.search(urllib.parse.unquote(k)) else f"{k}={v}" if sep else k
                     for k, sep, v in (p.partition("=") for p in parts.query.split("&") if p))
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def split_query(url: str) -> tuple[str, dict[str, str]]:
    """(the URL without its query string, the query as a dict): the OpenAI SDK appends request paths to its
    base_url as text, so a query string left in it would end up in the middle of the path."""
    parts = urllib.parse.urlsplit(url)
    base = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", parts.fragment))
    return base, dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))


class Redactor:
    """Replaces every known secret in a text by ***, also as it appears URL-encoded."""

    def __init__(self, secrets: list[str]):
        forms = set()
        for secret in secrets:
            if len(secret) >= MIN_LENGTH:
                forms |= {secret, urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret)}
        self.forms = sorted(forms, key=len, reverse=True)  # the longest first: a secret may contain another

    def __call__(self, text):
        if not isinstance(text, str):
            return text
        for form in self.forms:
            text = text.replace(form, MASK)
        return text
