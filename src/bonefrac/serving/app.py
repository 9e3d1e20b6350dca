"""The HTTP service: a REST API over one loaded ``Ensemble`` and a single-page UI at ``/``.

    from bonefrac.serving import create_app
    app = create_app("models/ensemble")        # loads (and sha256-checks) the model once
    # uvicorn.run(app, host="127.0.0.1", port=8000)

Concurrency: the model is loaded once and shared. ONNX Runtime sessions are thread-safe for
``run()``, so requests run on a fixed pool of ``workers`` threads (the bound on simultaneous
inference); at most ``workers + queue`` prediction requests are admitted at a time and the rest
get 503 (``limits.LimitsMiddleware``). Errors are JSON ``{"detail": "..."}`` in plain words;
tracebacks go to the server log, never into a response.
"""

import asyncio
import base64
import contextlib
import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, BinaryIO

import numpy as np
from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException

from bonefrac import DISCLAIMER, InputError, __version__
from bonefrac.data.io import Decoded
from bonefrac.inference.detections import shown_detections
from bonefrac.inference.ensemble import Ensemble, Prediction
from bonefrac.inference.heatmap import heat_layer, render_overlay
from bonefrac.inference.operating_points import UnknownOperatingPoint
from bonefrac.inference.predict import (
    model_fingerprint,
    model_info,
    predict_decoded,
)
from bonefrac.inference.runners import default_threads
from bonefrac.serving.audit import AuditLog
from bonefrac.serving.auth import TokenStore
from bonefrac.serving.docs import api_reference_html
from bonefrac.serving.limits import DEADLINE_KEY, LimitsMiddleware
from bonefrac.serving.ratelimit import ConcurrencyLimiter, RateLimiter
from bonefrac.serving.security import (
    GuardMiddleware,
    RecordMiddleware,
    RefusalDigest,
    SecurityConfig,
    audit_results,
    audit_uploads,
    flush_refusals,
    require_client,
    scrub_paths,
    write_audit,
)
from bonefrac.serving.uploads import FORMATS_TEXT, UploadError, decode_upload

log = logging.getLogger("bonefrac.serving")

STATIC = Path(__file__).resolve().parent / "static"
MODEL_CARD = "MODEL_CARD.md"
MULTIPART_SLACK = 64 * 1024  # multipart boundaries and headers around one file
# Every /v1 route: the token GuardMiddleware accepted (and the Bearer scheme in the OpenAPI).
V1 = [Depends(require_client)]
ERRORS = {
    401: "no valid API token (the server runs with --token-file): send Authorization: Bearer",
    400: "two Authorization headers",
    408: "the upload did not arrive within the request timeout, or paused too long",
    413: "file or request too large (see `limits` in GET /v1/model)",
    415: f"unsupported file type or content (accepted: {FORMATS_TEXT})",
    422: "unreadable image (the reason is given) or a missing form field",
    429: "rate limit of this token (or address) reached, or it has its most requests in "
         "flight already; retry after Retry-After seconds",
    503: "server busy: too many requests running or queued; retry after Retry-After seconds",
    504: "prediction did not finish within the request timeout",
}

# FastAPI reads these annotations at run time, so this module does not use postponed ones.
_EXPLAIN = ("also return the heat map: the overlay figure (the image at its own size with the "
            "map, the localisation box, a colour bar and a caption), the map alone as a "
            "transparent layer, and the grayscale image, as base64 PNGs")
LAYER_MAX_SIDE = 256  # the transparent map layer: the browser upsamples it smoothly
ExplainQ = Annotated[bool, Query(description=_EXPLAIN)]
ExplainF = Annotated[bool, Form(alias="explain", description=_EXPLAIN + " (form field)")]
_POINT = ("which operating point's threshold drives `decision` (and is reported as "
          "`threshold`): default (the model's own threshold), triage (high sensitivity) or "
          "confirmation (high specificity); see `operating_points` in GET /v1/model")
PointQ = Annotated[str | None, Query(description=_POINT)]
PointF = Annotated[str | None, Form(alias="operating_point",
                                    description=_POINT + " (form field)")]


def model_summary(ens: Ensemble) -> dict:
    """Model identity for every response: ``model_info`` (as in the CLI's predictions.json),
    what each operating point means, and each member's file sha256."""
    return {
        **model_info(ens),
        "operating_point_info": {k: {"policy": p.policy, "description": p.description or ""}
                                 for k, p in ens.points.points.items()},
        "members": [{"name": m.name, "arch": m.arch, "input_size": m.preprocessing.size,
                     "fusion_weight": m.weight, "temperature": m.temperature,
                     "onnx_sha256": m.spec.onnx_sha256,
                     "weights_sha256": m.spec.weights_sha256} for m in ens.members],
    }


def _png_base64(img: Image.Image | bytes) -> str:
    if isinstance(img, Image.Image):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        img = buf.getvalue()
    return base64.b64encode(img).decode("ascii")


def explain_fields(ens: Ensemble, pred: Prediction, j: int, row: dict, display: np.ndarray,
                   threshold: float | None = None) -> dict:
    """The explain-only fields: the overlay figure at the upload's own size (the box and peak
    drawn from the row's columns, as the CLI's overlays), the map alone as a transparent layer
    (same aspect, at most ``LAYER_MAX_SIDE`` px; its alpha is the figure's fade below the
    threshold) and the grayscale image, as base64 PNGs. ``threshold``: the one that drove the
    row's decision (default: the model's)."""
    threshold = ens.threshold if threshold is None else threshold
    cam, prob = pred.cam[j], float(pred.prob[j])
    fig = render_overlay(display, cam, prob=prob, threshold=threshold,
                         decision=row["decision"],
                         boxes=shown_detections(row, ens.box_threshold),
                         peak=[row["peak_x"], row["peak_y"]])
    h, w = display.shape
    scale = min(1.0, LAYER_MAX_SIDE / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    layer = heat_layer(cam, size, prob=prob, threshold=threshold, alpha=1.0)
    return {"heatmap_png_base64": _png_base64(fig),
            "heatmap_layer_png_base64": _png_base64(layer),
            "image_png_base64": _png_base64(Image.fromarray(display))}


def _decode_one(ens: Ensemble, name: str, f: BinaryIO, explain: bool, max_bytes: int
                ) -> tuple[Decoded, str]:
    """One upload -> (its model inputs and, with ``explain``, the image at its own size to
    draw on; warning). Decoded once, in the isolated decode pool. Raises ``UploadError``."""
    return decode_upload(name, f, ens.sizes, max_bytes, display=explain, resize=ens.resize)


def predict_uploads(ens: Ensemble, uploads: list[tuple[str, BinaryIO]], explain: bool,
                    max_bytes: int, point: str | None = None) -> tuple[list[dict], list[dict]]:
    """Decode and predict uploads as one batch (runs on a worker thread).

    Decoding is ``serving.uploads`` (checked, streamed to a temporary file, decoded in the
    isolated decode pool: a file that crashes or hangs its decoder is a 422, never a 500);
    prediction and rows are the CLI's own (:func:`bonefrac.inference.predict.predict_decoded`).
    Returns (rows, errors): a row per good file (the CLI's predictions.json row, ``decision``
    at operating point ``point``, plus ``index``, ``shown_detections`` (the boxes the overlay
    and the web page draw: :func:`bonefrac.inference.detections.shown_detections`) and, with
    ``explain``, the images of
    :func:`explain_fields`) and ``{"index", "file", "status", "reason"}`` per bad one.
    """
    decoded, errors = [], []
    for i, (name, f) in enumerate(uploads):
        try:
            decoded.append((i, name, *_decode_one(ens, name, f, explain, max_bytes)))
        except UploadError as e:
            errors.append({"index": i, "file": name, "status": e.status, "reason": e.reason})
        except Exception:  # a bug here (not in the file) must not cost the others their results
            log.exception("decoding upload %r failed", name)
            errors.append({"index": i, "file": name, "status": 500,
                           "reason": "internal error while reading the file"})
    if not decoded:
        return [], errors
    rows, pred = predict_decoded(ens, [name for _, name, _, _ in decoded],
                                 [d for _, _, d, _ in decoded], [w for _, _, _, w in decoded],
                                 point=point)
    threshold = ens.points.threshold(point)
    out = []
    for j, ((i, _, d, _), row) in enumerate(zip(decoded, rows, strict=True)):
        row = {"index": i, **row, "shown_detections": shown_detections(row, ens.box_threshold)}
        if explain:
            row.update(explain_fields(ens, pred, j, row, d.display, threshold))
        out.append(row)
    return out, errors


def _new_app(ens: Ensemble, executor: ThreadPoolExecutor, limits: dict,
             security: SecurityConfig) -> FastAPI:
    """The FastAPI app with its state, its middlewares (limits, then the token and rate check,
    CORS when configured, headers and audit: ``serving.security``) and the executor's
    shutdown."""
    max_upload_bytes, max_batch_bytes = limits["max_upload_bytes"], limits["max_batch_bytes"]
    workers, queue, timeout_s = limits["workers"], limits["queue"], limits["timeout_s"]
    store = TokenStore(security.token_file) if security.token_file else None
    if store is not None:
        store.entries()  # a broken token file fails here, at start, not on the first request
    limiter = RateLimiter(security.rate_per_minute, security.rate_burst) \
        if security.rate_per_minute else None
    audit = AuditLog(security.audit_log, security.audit_max_bytes, keep=security.audit_keep,
                     anchor_every=security.audit_anchor_every) if security.audit_log else None
    refusals = RefusalDigest(security.refusal_interval_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        flusher = asyncio.create_task(flush_refusals(
            audit, refusals, min(5.0, security.refusal_interval_s))) if audit else None
        yield
        executor.shutdown(wait=False, cancel_futures=True)
        if audit is not None:
            flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flusher
            await write_audit(audit, refusals.due(None))  # no counted refusal left unwritten
            audit.close()

    app = FastAPI(
        title="bonefrac", version=__version__, lifespan=lifespan,
        description="P(fractured) for musculoskeletal radiographs, with heat maps (the "
                    "shipped model: its trained fracture map; ensemble-224, baseline: "
                    "Grad-CAM). "
                    + ("Every /v1 route needs 'Authorization: Bearer TOKEN' (a token from "
                       "`bonefrac token create`); 401 without one, 429 over the rate limit. "
                       if security.token_file else "") + DISCLAIMER,
        docs_url=None, redoc_url=None)  # the stock pages load Swagger/ReDoc from a CDN
    app.state.ensemble = ens
    app.state.limits = limits
    app.state.security = security
    body_caps = {"/v1/predict": max_upload_bytes + MULTIPART_SLACK,
                 "/v1/predict/batch": max_batch_bytes}
    # Added innermost first: a request meets Record, CORS, Guard, then Limits.
    app.add_middleware(LimitsMiddleware, capacity=workers + queue, timeout_s=timeout_s,
                       max_body=body_caps.get, body_idle_s=limits["body_idle_s"])
    app.add_middleware(GuardMiddleware, store=store, limiter=limiter,
                       clients=_concurrency(security.client_concurrency),
                       public=_concurrency(security.public_concurrency))
    if security.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(security.cors_origins),
                           allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"],
                           expose_headers=["Retry-After"])
    app.add_middleware(RecordMiddleware, audit=audit, hsts=security.hsts, refusals=refusals,
                       model={"model_id": ens.model_id,
                              "model_fingerprint": model_fingerprint(ens)})
    return app


def _concurrency(limit: int | None) -> ConcurrencyLimiter | None:
    return ConcurrencyLimiter(limit) if limit else None


def _add_predict_routes(app: FastAPI, ens: Ensemble, executor: ThreadPoolExecutor,
                        summary: dict, limits: dict) -> None:
    """POST /v1/predict and /v1/predict/batch, run on ``executor`` within the deadline."""
    max_upload_bytes, max_batch_files = limits["max_upload_bytes"], limits["max_batch_files"]
    timeout_s = limits["timeout_s"]

    def check_point(query: str | None, form: str | None) -> str | None:
        point = query or form
        try:
            ens.points.check(point)
        except UnknownOperatingPoint as e:
            raise HTTPException(422, f"operating_point: {e}") from None
        return point

    async def run_job(request: Request, uploads: list[UploadFile], explain: bool,
                      point: str | None = None):
        items = [(Path(u.filename or "upload").name, u.file) for u in uploads]
        await audit_uploads(request, items)
        fut = executor.submit(predict_uploads, ens, items, explain, max_upload_bytes, point)
        remaining = request.scope[DEADLINE_KEY] - asyncio.get_running_loop().time()
        try:
            rows, errors = await asyncio.wait_for(asyncio.wrap_future(fut), max(0.0, remaining))
        except TimeoutError:
            fut.cancel()  # drops it if still queued; a running one finishes on its own
            raise HTTPException(504, f"prediction did not finish within {timeout_s:g} s; "
                                     "the server may be overloaded") from None
        audit_results(request, rows, errors)
        return rows, [{**e, "reason": scrub_paths(e["reason"])} for e in errors]

    @app.post("/v1/predict", tags=["predict"], dependencies=V1,
              responses={c: {"description": ERRORS[c]} for c in ERRORS})
    async def predict(request: Request,
                      file: Annotated[UploadFile, File(description="radiograph or DICOM")],
                      explain: ExplainQ = False, explain_form: ExplainF = False,
                      operating_point: PointQ = None, operating_point_form: PointF = None
                      ) -> dict:
        """P(fractured) for one radiograph: fused and per-member probabilities, the decision at
        the chosen operating point (``operating_point``, default: the model's threshold) and
        at each named one, where the model looked (the heat map's peak ``peak_x``, ``peak_y``
        and box ``box_x0`` .. ``box_y1``, fractions of the image's width/height, with its
        ``box_score``), the model's identity; with ``explain``, the overlay images."""
        point = check_point(operating_point, operating_point_form)
        rows, errors = await run_job(request, [file], explain or explain_form, point)
        if errors:
            raise HTTPException(errors[0]["status"], f"{errors[0]['file']}: "
                                                     f"{errors[0]['reason']}")
        return {"prediction": rows[0], "model": summary, "disclaimer": DISCLAIMER}

    @app.post("/v1/predict/batch", tags=["predict"], dependencies=V1,
              responses={c: {"description": ERRORS[c]} for c in ERRORS})
    async def predict_batch(request: Request,
                            files: Annotated[list[UploadFile], File(description="files")],
                            explain: ExplainQ = False, explain_form: ExplainF = False,
                            operating_point: PointQ = None, operating_point_form: PointF = None
                            ) -> dict:
        """Several files in one request: a result per good file and an error (file, status,
        reason) per bad one; bad files never cost the good ones their results."""
        if len(files) > max_batch_files:
            raise HTTPException(413, f"{len(files)} files sent; at most {max_batch_files} "
                                     "per request")
        point = check_point(operating_point, operating_point_form)
        rows, errors = await run_job(request, files, explain or explain_form, point)
        return {"predictions": rows, "errors": errors, "n_ok": len(rows),
                "n_failed": len(errors), "model": summary, "disclaimer": DISCLAIMER}


def _add_info_routes(app: FastAPI, ens: Ensemble, summary: dict, model_card: str | None,
                     limits: dict) -> None:
    """GET /v1/model, /healthz, the web page, the API reference and the static files."""
    @app.get("/v1/model", tags=["model"], dependencies=V1)
    async def get_model() -> dict:
        """The model's metadata (operating points, validation, provenance), its model card
        (MODEL_CARD.md in the model folder, or null) and the service's limits."""
        return {"model": summary, "meta": ens.meta, "model_card": model_card,
                "limits": limits, "disclaimer": DISCLAIMER}

    @app.api_route("/healthz", methods=["GET", "HEAD"], tags=["service"])
    async def healthz() -> dict:
        """Liveness, without a token; the model's identity only when tokens are off."""
        if app.state.security.token_file is not None:
            return {"status": "ok"}
        return {"status": "ok", "model_id": ens.model_id, "version": __version__}

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html")  # headers: serving.security

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(api_reference_html(app.openapi()))

    app.mount("/static", StaticFiles(directory=STATIC), name="static")


def _form_hint(body: object, expected: str) -> str:
    """Why a form field is missing, in the client's terms: the field names it did send."""
    got = list(dict.fromkeys(body.keys())) if isinstance(body, FormData) else []
    if not got:
        return f" (no form fields sent: send the file as the multipart form field '{expected}')"
    return (f" (got form field{'s' if len(got) > 1 else ''} "
            f"{', '.join(repr(k[:64]) for k in got[:8])}; send the file as '{expected}')")


def _add_error_handlers(app: FastAPI) -> None:
    """422 in plain words for invalid requests; 500 without a traceback for bugs."""
    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            loc = err.get("loc", ())
            where = ".".join(str(x) for x in loc if x not in ("body", "query"))
            msg = err.get("msg", "invalid")
            if err.get("type") == "missing" and loc[:1] == ("body",) and len(loc) == 2:
                msg += _form_hint(exc.body, str(loc[1]))
            parts.append(f"{where}: {msg}" if where else msg)
        return JSONResponse({"detail": "; ".join(parts) or "invalid request"}, status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": "internal server error (see the server log)"},
                            status_code=500)


def create_app(model: str | os.PathLike | Ensemble, *, max_upload_bytes: int = 32 * 2**20,
               max_batch_files: int = 16, max_batch_bytes: int = 128 * 2**20,
               workers: int = 2, queue: int = 16, timeout_s: float = 60.0,
               body_idle_s: float = 10.0, threads: int | None = None, backend: str = "auto",
               security: SecurityConfig | None = None) -> FastAPI:
    """Build the app around one model, loaded here once (or passed in already loaded).

    Args:
        model: model folder (ensemble or training run) or a loaded ``Ensemble``.
        max_upload_bytes: cap on one file (413 above it).
        max_batch_files, max_batch_bytes: caps on one batch request (413 above them).
        workers: predictions run at the same time (threads sharing the model).
        queue: further prediction requests allowed to wait; beyond that, 503.
        timeout_s: per-request deadline from arrival to answer (408 upload, 504 inference).
        body_idle_s: the longest pause within an upload (408 beyond); the body is read whole
            before the request takes a worker or queue place.
        threads: ONNX Runtime threads per run; default: the CPUs shared among ``workers``.
        security: tokens, rate limit, audit log, CORS, HSTS (``serving.security``); default:
            none of them.
    Raises:
        ModelFileError: the model folder is missing, tampered with or malformed.
        TokenFileError: the token file is not a bonefrac token file.
        OSError: the audit log cannot be opened.
    """
    if min(max_upload_bytes, max_batch_files, max_batch_bytes, workers) < 1 or queue < 0 \
            or timeout_s <= 0 or body_idle_s <= 0:
        raise InputError("limits must be positive (queue may be 0)")
    ens = model if isinstance(model, Ensemble) else Ensemble.load(
        model, backend=backend, threads=threads or max(1, default_threads() // workers))
    card_path = ens.root / MODEL_CARD
    model_card = card_path.read_text(encoding="utf-8") if card_path.is_file() else None
    summary = model_summary(ens)
    limits = {"max_upload_bytes": max_upload_bytes, "max_batch_files": max_batch_files,
              "max_batch_bytes": max_batch_bytes, "workers": workers, "queue": queue,
              "timeout_s": timeout_s, "body_idle_s": body_idle_s}
    executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bonefrac-infer")

    app = _new_app(ens, executor, limits, security or SecurityConfig())
    _add_predict_routes(app, ens, executor, summary, limits)
    _add_info_routes(app, ens, summary, model_card, limits)
    _add_error_handlers(app)
    return app
