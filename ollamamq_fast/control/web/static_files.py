"""The dashboard's static files, read once from the package and served from memory.

The pages contain no data (every number arrives through the token-guarded
API), so they are served without the token: a browser must be able to load the
login form before it has one.
"""

from __future__ import annotations

from importlib import resources

import blake3

from ollamamq_fast.control.http import Response

# Pages by path; everything else under static/ is served at /static/<name>.
PAGES = {"/": "index.html", "/usage": "usage.html", "/playground": "playground.html"}

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}

# The admin token sits in sessionStorage, so script injection is the threat
# that matters: only our own files may run, the pages talk only to this origin,
# and no other site may frame them (clickjacking an admin action).
SECURITY_HEADERS = [
    ("content-security-policy",
     ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
      "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
]


class StaticFiles:
    """Every file of static/, with its content type and ETag, keyed by URL path."""

    def __init__(self, files: dict[str, tuple[bytes, str]]) -> None:
        self.files: dict[str, tuple[bytes, str, str]] = {}
        for name, (body, ctype) in files.items():
            etag = '"' + blake3.blake3(body).hexdigest()[:20] + '"'
            self.files[name] = (body, ctype, etag)

    @classmethod
    def from_package(cls) -> StaticFiles:
        """Read static/ from the installed package (called once per admin app)."""
        folder = resources.files(__package__).joinpath("static")
        files: dict[str, tuple[bytes, str]] = {}
        for entry in folder.iterdir():
            suffix = "." + entry.name.rsplit(".", 1)[-1]
            ctype = CONTENT_TYPES.get(suffix)
            if entry.is_file() and ctype is not None:
                files[entry.name] = (entry.read_bytes(), ctype)
        return cls(files)

    def lookup(self, path: str) -> str | None:
        """The file name serving `path`, or None when the path is not a page or asset."""
        if path in PAGES:
            return PAGES[path]
        if path.startswith("/static/"):
            name = path[len("/static/"):]
            # Names are looked up in a dict built from the folder listing, so
            # "../" or a subfolder can never reach another file.
            return name if name in self.files else None
        return None

    def response(self, path: str, if_none_match: str | None) -> Response | None:
        """The file for `path` (304 when the browser's copy is current), or None."""
        name = self.lookup(path)
        if name is None:
            return None
        body, ctype, etag = self.files[name]
        # no-cache = revalidate every time: an upgraded gateway serves new
        # pages at once, and the 304 keeps reloads cheap.
        headers = [("content-type", ctype), ("cache-control", "no-cache"), ("etag", etag),
                   *SECURITY_HEADERS]
        if if_none_match is not None and etag in if_none_match:
            return Response(304, b"", headers)
        return Response(200, body, headers)
