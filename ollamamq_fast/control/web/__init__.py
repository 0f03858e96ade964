"""The web dashboard and chat playground served on the admin port.

Plain HTML, CSS and JavaScript in `static/` (no front-end build step); the
Python side only serves those files and the few routes the pages need that the
admin API proper does not have: `/api/info`, the playground's proxy to the data
plane, and per-user limits.
"""

from ollamamq_fast.control.web.routes import WebRoutes

__all__ = ["WebRoutes"]
