"""The web dashboard: server-rendered pages (Jinja, htmx), served by the service itself."""
