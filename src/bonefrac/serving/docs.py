"""An offline API reference page rendered from the OpenAPI document.

FastAPI's stock ``/docs`` (Swagger UI) and ``/redoc`` load their JavaScript from a CDN and so
show a blank page on an offline machine. This page is plain server-side HTML built from the
same ``/openapi.json`` (which is served as usual, for any OpenAPI tool to use).
"""

from __future__ import annotations

from html import escape

# The fields of one prediction (``prediction`` in POST /v1/predict, each of ``predictions`` in
# the batch answer): the CLI's predictions.json row, plus ``index`` and the explain images.
PREDICTION_FIELDS: tuple[tuple[str, str], ...] = (
    ("index", "position of the file in the request"),
    ("file", "the uploaded file's name"),
    ("prob_fractured", "fused, calibrated P(fractured)"),
    ("prob_<member>", "each ensemble member's calibrated P(fractured)"),
    ("decision", "fractured or non_fractured at `threshold`; uncertain when the input-domain "
                 "gate flagged the image (`warning` says why)"),
    ("confidence", "the calibrated probability that `decision` is right: prob_fractured for "
                   "fractured, 1 - prob_fractured for non_fractured, null for uncertain (a "
                   "fractured call at a low triage threshold can read 0.22)"),
    ("threshold", "the threshold that drove `decision`: the model's default one, or that of "
                  "the operating point asked for with `operating_point`"),
    ("decision_<point>", "the decision at each named operating point (triage, confirmation)"),
    ("model_id, version", "which model and which bonefrac made the prediction"),
    ("warning", "why the input-domain gate flagged the image (colour, too small, blank, "
                "aspect ratio, DICOM modality/body part, outside the training distribution; "
                "'' when none)"),
    ("domain_score", "the gate's learned check: how far the image's features lie from the "
                     "training images', over a limit chosen on validation; > 1 is outside the "
                     "training distribution (null where the model has no gate)"),
    ("peak_x, peak_y", "the heat map's peak, as fractions (0..1) of the image's width and "
                       "height from its top-left corner"),
    ("box_x0, box_y0, box_x1, box_y1", "the best box (rank 1 of `detections`), fractions of "
                                       "the image's width and height; a model without a "
                                       "detection head gives the region around the map's "
                                       "peak"),
    ("box_score", "the best box's score: its detection score, or (no detection head) the "
                  "fused fracture map's peak, else P(fractured)"),
    ("detections", "every scored box, best first: rank, score and x0, y0, x1, y1 (fractions "
                   "of the image); the overlay shows those at or above the model's box "
                   "threshold, and none unless the decision is fractured"),
    ("shown_detections", "the detections to draw: those at or above the model's box "
                         "threshold, none unless the decision is fractured (what the overlay "
                         "and the web page show)"),
    ("heatmap_png_base64", "with explain: PNG of the overlay figure: the image at its own size "
                           "and aspect with the map (faded in proportion to P / threshold "
                           "below the threshold), the box, the peak, a colour bar and a "
                           "caption (P, threshold, decision)"),
    ("heatmap_layer_png_base64", "with explain: the map alone as a transparent PNG (same "
                                 "aspect, at most 256 px), to lay over the image"),
    ("image_png_base64", "with explain: the grayscale image as decoded, at its own size"),
)


def _resolve(spec: dict, schema: dict) -> dict:
    ref = schema.get("$ref", "")
    if ref.startswith("#/components/schemas/"):
        return spec.get("components", {}).get("schemas", {}).get(ref.rsplit("/", 1)[1], {})
    return schema


def _type(spec: dict, schema: dict) -> str:
    schema = _resolve(spec, schema)
    if "anyOf" in schema:
        return " | ".join(_type(spec, s) for s in schema["anyOf"])
    if schema.get("type") == "array":
        return f"array of {_type(spec, schema.get('items', {}))}"
    if schema.get("format") == "binary" or schema.get("contentMediaType"):
        return "file"
    return str(schema.get("type", "object"))


def _fields(spec: dict, op: dict) -> list[tuple[str, str, str, bool, str]]:
    """(name, where, type, required, description) for query parameters and form fields."""
    out = [(p["name"], p["in"], _type(spec, p.get("schema", {})), p.get("required", False),
            p.get("description", "")) for p in op.get("parameters", [])]
    for media, content in op.get("requestBody", {}).get("content", {}).items():
        body = _resolve(spec, content.get("schema", {}))
        for name, prop in body.get("properties", {}).items():
            out.append((name, media, _type(spec, prop), name in body.get("required", []),
                        prop.get("description", "")))
    return out


def api_reference_html(spec: dict) -> str:
    """One HTML page listing every operation: method, path, summary, fields and responses."""
    info = spec.get("info", {})
    parts = [f"<h1>{escape(info.get('title', 'API'))} {escape(info.get('version', ''))} - "
             "API reference</h1>",
             f"<p>{escape(info.get('description', ''))}</p>",
             '<p>Machine-readable: <a href="/openapi.json">/openapi.json</a> (OpenAPI '
             f"{escape(spec.get('openapi', ''))}). Web page: <a href=\"/\">/</a>.</p>",
             '<section class="op"><h2>Prediction fields</h2><table><tr><th>field</th>'
             "<th>meaning</th></tr>"]
    parts += [f"<tr><td><code>{escape(n)}</code></td><td>{escape(d)}</td></tr>"
              for n, d in PREDICTION_FIELDS]
    parts.append("</table></section>")
    for path, ops in spec.get("paths", {}).items():
        for method, op in ops.items():
            parts.append(f'<section class="op"><h2><code>{method.upper()} {escape(path)}</code>'
                         f"</h2><p><b>{escape(op.get('summary', ''))}</b></p>"
                         f"<p>{escape(op.get('description', ''))}</p>")
            fields = _fields(spec, op)
            if fields:
                parts.append("<table><tr><th>field</th><th>in</th><th>type</th>"
                             "<th>required</th><th>description</th></tr>")
                parts += [f"<tr><td><code>{escape(n)}</code></td><td>{escape(w)}</td>"
                          f"<td>{escape(t)}</td><td>{'yes' if r else 'no'}</td>"
                          f"<td>{escape(d)}</td></tr>" for n, w, t, r, d in fields]
                parts.append("</table>")
            parts.append("<ul>" + "".join(
                f"<li><code>{escape(code)}</code> {escape(r.get('description', ''))}</li>"
                for code, r in op.get("responses", {}).items()) + "</ul></section>")
    return ('<!doctype html><html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(info.get('title', 'API'))} API reference</title>"
            '<link rel="stylesheet" href="/static/style.css"></head>'
            f'<body class="docs"><main>{"".join(parts)}</main></body></html>')
