"""An offline API reference page rendered from the OpenAPI document.

FastAPI's stock ``/docs`` (Swagger UI) and ``/redoc`` load their JavaScript from a CDN and so
show a blank page on an offline machine. This page is plain server-side HTML built from the
same ``/openapi.json`` (which is served as usual, for any OpenAPI tool to use).
"""

from __future__ import annotations

from html import escape


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
             f"{escape(spec.get('openapi', ''))}). Web page: <a href=\"/\">/</a>.</p>"]
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
