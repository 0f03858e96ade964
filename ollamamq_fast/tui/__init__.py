"""The terminal dashboard (Textual): `ollamamq-fast top` and the in-process view of `serve`."""
