"""Pure byte-level functions of the HTTP and JSON wire: no I/O, no state."""
