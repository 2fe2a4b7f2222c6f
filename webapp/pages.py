"""The web app's pages: the Jinja2 templates (autoescaped), the header's links, and the
error page, shared by the handlers (`webapp.app`) and the middleware (`webapp.middleware`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
from starlette.responses import HTMLResponse

from webapp.sessions import Session

HERE = Path(__file__).parent

_TEMPLATES = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True, undefined=jinja2.StrictUndefined,
    trim_blocks=True, lstrip_blocks=True)  # fmt: skip
NO_STORE = {"cache-control": "no-store"}
ADMIN_PAGES = [("/admin", "Admin"), ("/admin/cycles", "Cycles"), ("/admin/policies", "Policies")]


def nav_links(role: str) -> list[tuple[str, str]]:
    """The header's links: the labeling page for everyone, the admin pages for admins."""
    return [("/label", "Label")] + (ADMIN_PAGES if role == "admin" else [])


_TEMPLATES.globals["nav_links"] = nav_links


def render(template: str, status: int = 200, **context: Any) -> HTMLResponse:
    context.setdefault("session", None)
    context.setdefault("current", "")  # the page's own path: its header link is marked
    return HTMLResponse(_TEMPLATES.get_template(template).render(**context), status_code=status, headers=NO_STORE)


def render_error(status: int, title: str, message: str, session: Session | None = None,
                 link: tuple[str, str] = ("/label", "Back to labeling")) -> HTMLResponse:  # fmt: skip
    return render("error.html", status, title=title, message=message, link=link, session=session)
