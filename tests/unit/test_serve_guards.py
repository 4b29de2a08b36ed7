"""The ingress's body guard on the ASGI interface itself (no server: the middleware is
called as Serve's proxy calls the app) and the 500 answers' request ids (issue 23 N3 and the
lower items): a JSON body's values are bounded before anything parses it, and a 500 tells
the client a request id while the replica's log gets the exception."""
import asyncio
import json
import logging

from vdvae_dist.serve.guards import MAX_JSON_VALUES, BodyLimitMiddleware


async def _read_all_then_ok(scope, receive, send):
    """An app that reads the whole body (as FastAPI does before it parses JSON)."""
    while True:
        message = await receive()
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"parsed", "more_body": False})


def _post(body: bytes, content_type: str | None, chunk: int = 4096) -> tuple[int, dict | bytes]:
    headers = [(b"content-type", content_type.encode())] if content_type else []
    parts = [body[i:i + chunk] for i in range(0, len(body), chunk)] or [b""]
    sent = []

    async def receive():
        part = parts.pop(0)
        return {"type": "http.request", "body": part, "more_body": bool(parts)}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/sample", "headers": headers}
    asyncio.run(BodyLimitMiddleware(_read_all_then_ok)(scope, receive, send))
    status = sent[0]["status"]
    data = b"".join(m.get("body", b"") for m in sent[1:])
    return status, json.loads(data) if status != 200 else data


def test_a_json_body_with_too_many_values_is_refused_before_it_is_parsed():
    values = "[" + "1," * MAX_JSON_VALUES + "1]"
    for content_type in ("application/json", "application/json; charset=utf-8", "application/merge+json", None):
        status, body = _post(b'{"n": 1, "temperature": ' + values.encode() + b"}", content_type)
        assert status == 413 and body["field"] == "body", (content_type, body)
        assert f"at most {MAX_JSON_VALUES:,} values" in body["allowed"]
    ok = "[" + "1," * (MAX_JSON_VALUES - 10) + "1]"
    assert _post(b'{"temperature": ' + ok.encode() + b"}", "application/json")[0] == 200
    # other bodies (an upload in a multipart form) may hold any bytes
    assert _post(b"," * (2 * MAX_JSON_VALUES), "multipart/form-data; boundary=x")[0] == 200


def test_a_500_names_a_request_id_and_the_log_has_the_detail(caplog):
    from vdvae_dist.serve.http_errors import logged_server_error

    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        try:
            raise RuntimeError("secret detail at /home/alice/run")
        except RuntimeError as e:
            error = logged_server_error(e, "the model failed on this request")
    body = error.body()
    assert error.status == 500 and "secret" not in json.dumps(body) and "/home" not in json.dumps(body)
    assert len(body["request_id"]) == 16 and body["request_id"] in body["error"]
    logged = caplog.text
    assert body["request_id"] in logged and "secret detail at /home/alice/run" in logged
    assert "Traceback" in logged
