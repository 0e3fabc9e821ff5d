"""The framework's ceiling for bench/peers.py: a bare Sanic app answering given JSON at given paths.

    .venv/bin/python bench/bare_sanic.py ANSWERS.json PORT WORKERS

ANSWERS.json maps a GET path to the JSON body it answers (what our server answered for it). Each
request serialises its answer again, as a handler returning a dict does; Sanic runs as ours does
(orjson, no uvloop, no access log), so the gap between the two is what our server adds.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import orjson
from sanic import Request, Sanic
from sanic.response import HTTPResponse
from sanic.response import json as json_response

app = Sanic("bare", dumps=orjson.dumps)
app.config.USE_UVLOOP = False  # as ours (server/app.py)
ANSWERS: dict[str, Any] = json.loads(Path(sys.argv[1]).read_text())


def _handler(answer: Any) -> Any:
    async def handler(request: Request) -> HTTPResponse:
        return json_response(answer)
    return handler


for number, (route, body) in enumerate(ANSWERS.items()):
    app.add_route(_handler(body), route, methods=["GET"], name=f"answer{number}")


if __name__ == "__main__":
    workers = int(sys.argv[3])
    app.run(host="127.0.0.1", port=int(sys.argv[2]), workers=workers, access_log=False, motd=False,
            single_process=workers == 1)
