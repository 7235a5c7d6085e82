"""The HTTP application: the page, the API, authentication and security headers.

`create_app(service) -> FastAPI`, where `Service` holds the started `engine.Engine`, the
`uploads.Limits`, the optional token and the model's description. Routes:

- `GET /` (the page), `GET /app.js`, `GET /style.css`: static files read once at start (no
  path from a request is ever looked up on disk);
- `GET /healthz`: `{"status": "ok"}` while the model worker runs (503 otherwise); no token;
- `GET /api/v1/model`: taxonomy, preprocessing, members (kind, model, source, temperature),
  version, the compiled batch sizes, the limits and the explanation methods;
- `POST /api/v1/predict`: multipart, parts named `files` (images or zips) -> `{"rows": [...],
  "skipped": [...]}`, one row per file in the order sent, in `predict`'s row schema;
- `POST /api/v1/explain`: multipart, one part `file`, a field `method` (`gradcam` or
  `integrated_gradients`), optional `target` (class index; default the predicted class) ->
  the row, the map (PNG, network frame), the overlay on the crop and the crop (PNG), and where
  the map was computed (layer, map size, input size);
- `POST /api/v1/export?format=csv|jsonl|html`: JSON `{"rows": [...]}` -> the file
  (`predict.write_rows`' CSV/JSON lines, or `batch_report.render`);
- `GET /api/v1/openapi.json`: the OpenAPI document.

With a token every `/api/` call needs `Authorization: Bearer TOKEN` (401 otherwise). Every
response carries security headers (a CSP without inline script, nosniff, no framing, no
referrer); API responses are `no-store`.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import dataclasses
import hmac
import importlib.resources
import json
import os
import tempfile

import cv2
import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from sipak_jax import imageio
from sipak_jax.serve import batch_report
from sipak_jax.serve.engine import EXPLAIN_METHODS, Engine
from sipak_jax.serve.uploads import Item, Limits, UploadError, expand, read_multipart, size_text

API_VERSION = "v1"
MAX_OVERLAY_SIDE = 1024  # overlays of larger crops are drawn on a downscaled copy

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
    "form-action 'self'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cross-origin-opener-policy", b"same-origin"),
    (b"cross-origin-resource-policy", b"same-origin"),
    (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"),
]
_STATIC = {
    "/": ("index.html", "text/html"),
    "/app.js": ("app.js", "text/javascript"),
    "/style.css": ("style.css", "text/css"),
}


@dataclasses.dataclass
class Service:
    engine: Engine
    model_info: dict
    limits: Limits = dataclasses.field(default_factory=Limits)
    token: str | None = None
    decode_workers: int = 4


class Guard:
    """ASGI middleware: the bearer token on `/api/`, security headers on every response."""

    def __init__(self, app, token: str | None):
        self.app, self.token = app, token

    def _authorised(self, scope) -> bool:
        if not self.token or not scope["path"].startswith("/api/"):
            return True
        if scope["path"] == f"/api/{API_VERSION}/openapi.json":
            return True
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        expected = f"Bearer {self.token}".encode()
        return hmac.compare_digest(given, expected)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        api = scope["path"].startswith("/api/")

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", [])) + SECURITY_HEADERS
                if api:
                    headers.append((b"cache-control", b"no-store"))
                message = {**message, "headers": headers}
            await send(message)

        if not self._authorised(scope):
            response = JSONResponse(
                {"detail": "missing or wrong token: send the header Authorization: Bearer TOKEN"},
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
            return await response(scope, receive, send_with_headers)
        return await self.app(scope, receive, send_with_headers)


def _png_b64(image: np.ndarray) -> str:
    img = image[..., ::-1] if image.ndim == 3 else image
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(img))
    if not ok:
        raise ValueError("could not encode a PNG")
    return base64.b64encode(buf.tobytes()).decode("ascii")


def _shrink(rgb: np.ndarray) -> np.ndarray:
    h, w = rgb.shape[:2]
    scale = MAX_OVERLAY_SIDE / max(h, w)
    if scale >= 1:
        return rgb
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)


def _static_files() -> dict:
    root = importlib.resources.files("sipak_jax.serve") / "static"
    return {route: ((root / name).read_bytes(), ctype) for route, (name, ctype) in _STATIC.items()}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status)


_MULTIPART_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                            "description": "cell images (PNG, JPEG, BMP, TIFF) or zips of them",
                        }
                    },
                    "required": ["files"],
                }
            }
        },
    }
}
_EXPLAIN_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "method": {"type": "string", "enum": ["gradcam", "integrated_gradients"]},
                        "target": {"type": "integer", "description": "class index"},
                    },
                    "required": ["file", "method"],
                }
            }
        },
    }
}


def create_app(service: Service) -> FastAPI:
    """The application (module docstring)."""
    app = FastAPI(
        title="sipak-jax screening service",
        version=service.model_info.get("version", ""),
        description="Cervical-cell classification: predictions, explanations, exports. "
        "A screening aid; every call needs a cytologist's review.",
        docs_url=None,  # Swagger UI loads scripts from a CDN: not on a lab network
        redoc_url=None,
        openapi_url=f"/api/{API_VERSION}/openapi.json",
    )
    for route, (body, ctype) in _static_files().items():

        async def page(body=body, ctype=ctype):
            return Response(body, media_type=ctype)

        app.add_api_route(route, page, methods=["GET"], include_in_schema=False)

    @app.exception_handler(UploadError)
    async def _upload_error(request: Request, exc: UploadError):
        return _error(exc.status, str(exc))

    h = Handlers(service)
    api = f"/api/{API_VERSION}"
    app.get("/healthz", summary="liveness: the model worker runs")(h.healthz)
    app.get(f"{api}/model", summary="the model: taxonomy, preprocessing, source")(h.model)
    app.post(
        f"{api}/predict",
        summary="classify images (parts named `files`; zips are opened)",
        openapi_extra=_MULTIPART_DOC,
    )(h.predict)
    app.post(
        f"{api}/explain",
        summary="Grad-CAM or Integrated Gradients for one image",
        openapi_extra=_EXPLAIN_DOC,
    )(h.explain)
    app.post(
        f"{api}/export", summary="rows as predict's CSV or JSON lines, or the batch's HTML report"
    )(h.export)
    app.add_middleware(Guard, token=service.token)
    return app


class Handlers:
    """The routes' bodies. Decoding, drawing and file writing run in a thread pool; the model
    runs on the engine's worker thread; the event loop only awaits."""

    def __init__(self, service: Service):
        self.service, self.engine, self.limits = service, service.engine, service.limits
        self.pool = concurrent.futures.ThreadPoolExecutor(
            service.decode_workers, "sipak-serve-decode"
        )

    async def _in_pool(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def healthz(self):
        if not self.engine.alive:
            return _error(503, "the model worker stopped")
        return {"status": "ok"}

    async def model(self):
        return {
            **self.service.model_info,
            "batch_sizes": list(self.engine.batch_sizes),
            "limits": self.limits.to_dict(),
            "explain_methods": list(EXPLAIN_METHODS)[:2],
        }

    async def decode(self, item: Item, keep_original: bool = False):
        if item.error is not None:
            return None, None, item.error
        spec, max_pixels = self.engine.predictor.spec, self.limits.max_pixels
        return await self._in_pool(
            lambda: imageio.decode_for_model(item.data, spec, item.name, keep_original, max_pixels)
        )

    async def classify(self, items: list[Item]) -> list[dict]:
        """One row per item, in order: predict's row, or {"path", "error"}."""
        from sipak_jax.predict import make_row

        with self.engine.incoming():
            decoded = await asyncio.gather(*(self.decode(i) for i in items))
            ok = [k for k, d in enumerate(decoded) if d[0] is not None]
            if ok:
                future = self.engine.predict(np.stack([decoded[k][0] for k in ok]))
        probs, unc = (await asyncio.wrap_future(future)) if ok else (None, None)
        at = {k: j for j, k in enumerate(ok)}
        rows = []
        for k, item in enumerate(items):
            if k not in at:
                rows.append({"path": item.name, "error": decoded[k][2]})
                continue
            u = None if unc is None else unc[at[k]]
            rows.append(make_row(item.name, probs[at[k]], self.engine.predictor, u))
        return rows

    async def _parts(self, request: Request):
        content_type = request.headers.get("content-type")
        return await read_multipart(request.stream(), content_type, self.limits)

    async def predict(self, request: Request):
        items, skipped = expand(await self._parts(request), self.limits)
        if not items:
            raise UploadError(400, "no files: send one or more parts named `files`")
        rows = await self.classify(items)
        return JSONResponse({"rows": rows, "skipped": skipped})  # plain json: rows are JSON

    async def export(self, request: Request, format: str = "csv"):
        rows = _rows_from_json(await _read_body(request, self.limits))
        if format == "html":
            page = batch_report.render(rows, self.service.model_info)
            return _attachment(page.encode(), "text/html; charset=utf-8", "screening_report.html")
        if format not in ("csv", "jsonl"):
            raise UploadError(400, f"format must be csv, jsonl or html, got {format!r}")
        data = await self._in_pool(_write_rows, rows, self.engine.predictor.class_names, format)
        ctype = "text/csv" if format == "csv" else "application/x-ndjson"
        return _attachment(data, f"{ctype}; charset=utf-8", f"predictions.{format}")

    async def explain(self, request: Request):
        from sipak_jax.report import map_description

        parts = await self._parts(request)
        method, item, target = _explain_request(parts, len(self.engine.predictor.class_names))
        image, original, error = await self.decode(item, keep_original=True)
        if image is None:
            return JSONResponse({"detail": error, "row": {"path": item.name, "error": error}}, 422)
        row = (await self.classify([item]))[0]
        target = row["label_index"] if target is None else target
        name = EXPLAIN_METHODS[method]
        frame_map = await asyncio.wrap_future(self.engine.explain(image, name, target))
        where = self.engine.describe(name)
        crop_png, overlay_png, map_png = await self._in_pool(
            _draw, original, frame_map, self.engine.predictor.spec
        )
        return {
            "row": row,
            "method": method,
            "target": target,
            "target_name": self.engine.predictor.class_names[target],
            "where": where,
            "description": "; ".join(dict.fromkeys(map_description(w) for w in where)),
            "map_png": map_png,
            "map_size": list(frame_map.shape),
            "overlay_png": overlay_png,
            "image_png": crop_png,
        }


def _explain_request(parts, num_classes: int) -> tuple[str, Item, int | None]:
    """(method, the one image, target class or None) of an explain request; UploadError."""
    fields = {p.name: p for p in parts}
    method = fields["method"].data.decode("utf-8", "replace") if "method" in fields else ""
    if method not in EXPLAIN_METHODS:
        raise UploadError(400, f"method must be gradcam or integrated_gradients, got {method!r}")
    files = [p for p in parts if p.name in ("file", "files")]
    if len(files) != 1:
        raise UploadError(400, "send exactly one image, in a part named `file`")
    target = None
    if "target" in fields:
        try:
            target = int(fields["target"].data)
        except ValueError:
            target = -1
        if not 0 <= target < num_classes:
            raise UploadError(400, f"target must be a class index, 0..{num_classes - 1}")
    return method, Item(files[0].filename or "image", data=files[0].data), target


def _draw(original: np.ndarray, frame_map: np.ndarray, spec: dict) -> tuple[str, str, str]:
    """(crop, overlay on the crop, the map in the network frame) as base64 PNGs."""
    from sipak_jax import preprocessing
    from sipak_jax.predict import overlay_on_original

    crop = _shrink(original)
    policy = spec.get("resize", preprocessing.DEFAULT_RESIZE)
    over = overlay_on_original(crop, frame_map, policy)
    gray = np.clip(np.rint(frame_map * 255), 0, 255).astype(np.uint8)
    return _png_b64(crop), _png_b64(over), _png_b64(gray)


def _rows_from_json(body: bytes) -> list[dict]:
    try:
        rows = json.loads(body)["rows"]
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise TypeError("rows must be a list of objects")
    except (ValueError, KeyError, TypeError) as e:
        raise UploadError(400, f'send JSON {{"rows": [...]}} ({e})') from None
    return rows


def _attachment(data: bytes, ctype: str, name: str) -> Response:
    return Response(
        data, media_type=ctype, headers={"content-disposition": f'attachment; filename="{name}"'}
    )


async def _read_body(request: Request, limits: Limits) -> bytes:
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limits.max_request_bytes:
            raise UploadError(
                413, f"the request is larger than {size_text(limits.max_request_bytes)}"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _write_rows(rows: list[dict], class_names, fmt: str) -> bytes:
    """predict's own writer, into a private temporary directory removed at once."""
    from sipak_jax.predict import write_rows

    with tempfile.TemporaryDirectory(prefix="sipak-serve-") as tmp:
        path = os.path.join(tmp, f"rows.{fmt}")
        try:
            write_rows(rows, path, class_names)
        except (TypeError, ValueError) as e:
            raise UploadError(400, f"the rows do not have predict's row schema ({e})") from None
        with open(path, "rb") as f:
            return f.read()
