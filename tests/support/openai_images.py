"""A small OpenAI-compatible images server on loopback, standing in for a cloud images API in tests.

`POST /v1/images/generations` (JSON) and `POST /v1/images/edits` (multipart) answer with `b64_json` PNGs of the
requested size in a flat colour, after `delay` seconds; `GET /v1/models` lists one model. A wrong or missing Bearer
key is a 401, a prompt containing `refuse` a 400 naming `prompt`, as OpenAI answers them; with `failing` set every
generation is a 500 (an outage). Every request is kept.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import functools
import io
import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from PIL import Image

COLOUR = (200, 40, 90)


@dataclass
class Call:
    path: str
    authorization: str
    fields: dict[str, Any]  # the JSON body, or the multipart form's text fields
    files: dict[str, bytes]


class OpenAIImagesServer:
    def __init__(self, key: str, delay: float = 0.0, port: int = 0) -> None:
        self.key, self.delay = key, delay
        self.failing = False
        self.calls: list[Call] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet in tests
                pass

            def do_GET(self) -> None:
                if not self._authorized():
                    return
                self._send(200, {"object": "list", "data": [{"id": "tiny-cloud", "object": "model"}]})

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fields, files = _parse(self.headers.get("Content-Type", ""), body)
                server.calls.append(Call(self.path, self.headers.get("Authorization", ""), fields, files))
                if not self._authorized():
                    return
                if server.failing:
                    self._send(500, {"error": {"message": "The server had an error", "type": "server_error"}})
                    return
                if "refuse" in str(fields.get("prompt", "")):
                    error = {"message": "Your request was rejected by the safety system.", "param": "prompt"}
                    self._send(400, {"error": {**error, "type": "invalid_request_error", "code": "content_policy"}})
                    return
                time.sleep(server.delay)
                width, height = (int(v) for v in str(fields.get("size", "64x64")).split("x"))
                data = [{"b64_json": _png(width, height)} for _ in range(int(fields.get("n", 1)))]
                self._send(200, {"created": int(time.time()), "data": data})

            def _authorized(self) -> bool:
                if self.headers.get("Authorization") == f"Bearer {server.key}":
                    return True
                self._send(401, {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}})
                return False

            def _send(self, status: int, payload: dict[str, Any]) -> None:
                raw = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        serve = functools.partial(self.httpd.serve_forever, poll_interval=0.02)  # a quick shutdown
        self._thread = threading.Thread(target=serve, name="openai-images", daemon=True)

    def __enter__(self) -> OpenAIImagesServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def _parse(content_type: str, body: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
    if content_type.startswith("application/json"):
        return json.loads(body or b"{}"), {}
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    fields: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True) or b""
        if part.get_filename():
            files[str(name)] = payload
        else:
            fields[str(name)] = payload.decode()
    return fields, files


def _png(width: int, height: int) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), COLOUR).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()
