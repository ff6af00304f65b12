"""The web dashboard (docs/dashboard.md): server-rendered pages under /ui on the API's app.

    sessions.py  sign-in sessions (in the database: every API process shares them; HttpOnly,
                 SameSite=Strict cookie) and their CSRF tokens
    queries.py   what the pages show, read from the store (keyset pages, indexed lookups)
    pages.py     the HTML (escaped), live sections as fragments
    routes.py    the routes, the state-changing POSTs (admin + CSRF), the server-sent events
    static/      dash.js and dash.css, hand-written (nothing from elsewhere)
"""
from fota.server.dashboard.routes import mount

__all__ = ["mount"]
