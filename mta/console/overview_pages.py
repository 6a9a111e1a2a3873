"""The overview: /overview (counts per hour for the last 48 hours and per day for the last
30 days as SVG charts drawn here, the same numbers as tables, the ratelimit's top sources)
and GET /api/overview?step=hour|day. The numbers come from Operations.overview, which
refuses a `user` (403)."""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mta.operations.overview import SERIES

from . import charts, i18n, pages
from .api import api_gate, error
from .context import Console
from .held_api import call, refused, status_of

# step name -> (seconds, buckets, x label every N buckets)
PERIODS = {"hour": (3600, 48, 6), "day": (86400, 30, 3)}
ERRORS = {403: "overview.forbidden", 404: "error.not_found"}


def label(start: float, step: int) -> str:
    """An hour in local time (hours line up in every whole-hour zone); a day as its UTC
    date, since the audit log counts days from UTC midnight."""
    if step == 3600:
        return time.strftime("%H:00", time.localtime(start))
    return time.strftime("%m-%d", time.gmtime(start))


def as_json(overview: Any, step_name: str) -> dict[str, Any]:
    return {"step": step_name, "seconds": overview.step, "starts": overview.starts,
            "series": overview.series, "totals": overview.totals,
            "top_sources": [dataclasses.asdict(s) for s in overview.top_sources]}


def routes(console: Console, clock: Callable[[], float] = time.time) -> list[Route]:
    async def fetch(request: Request, step_name: str) -> Any:
        seconds, buckets, _ = PERIODS[step_name]
        return await call(console.operations.overview, console.actor(request), now=clock(),
                          step=seconds, buckets=buckets)

    async def page(request: Request) -> Response:
        actor, refusal = pages.page_gate(console, request, "nav.overview")
        if refusal is not None:
            return refusal
        language = console.language(request)
        periods = []
        try:
            for name, (seconds, _, every) in PERIODS.items():
                view = await fetch(request, name)
                labels = [label(start, seconds) for start in view.starts]
                series = [charts.Series(key, i18n.text(f"series.{key}", language),
                                        view.series[key]) for key in SERIES]
                title = i18n.text(f"overview.{name}", language)
                periods.append({
                    "name": name, "title": title, "view": view, "labels": labels,
                    "series": series, "legend": charts.legend(series),
                    "chart": charts.line_chart(f"chart-{name}", title, labels, series,
                                               label_every=every)})
        except Exception as exc:  # noqa: BLE001 - a page with the status, no traceback
            refused(request, console, exc)
            status, _ = status_of(exc)
            return pages.render(console, request, "error.html", status,
                                message=ERRORS.get(status, "held.error.failed"))
        return pages.render(console, request, "overview.html", title="nav.overview",
                            periods=periods, keys=list(SERIES),
                            sources=periods[0]["view"].top_sources if periods else [],
                            when=lambda t: time.strftime("%Y-%m-%d %H:%M",
                                                         time.localtime(t)))

    async def api(request: Request) -> Response:
        _, refusal = api_gate(console, request, "the overview")
        if refusal is not None:
            return refusal
        step_name = request.query_params.get("step", "hour")
        if step_name not in PERIODS:
            return error(400, "bad_request", "step is hour or day")
        try:
            view = await fetch(request, step_name)
        except Exception as exc:  # noqa: BLE001 - JSON with its status, never a traceback
            refused(request, console, exc)
            status, code = status_of(exc)
            return error(status, code, str(exc)[:300] if status < 500
                         else "the operation failed; see the log")
        return JSONResponse(as_json(view, step_name))

    return [Route("/overview", page, methods=["GET"], name="nav.overview"),
            Route("/api/overview", api, methods=["GET"])]
