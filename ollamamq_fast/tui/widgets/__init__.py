"""The dashboard's widgets: one job each (see ollamamq_fast/tui/app.py for the layout)."""
