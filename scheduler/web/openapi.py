"""The OpenAPI document as the API answers: its error envelope (never FastAPI's 422), and bearer auth."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

ENVELOPE = {
    "type": "object",
    "required": ["success", "error"],
    "properties": {
        "success": {"type": "boolean", "enum": [False]},
        "error": {"type": "string"},
        "details": {"type": "object"},
    },
}
ERRORS = {
    "400": "Bad input: a malformed id, an unknown or repeated parameter, a refused retry",
    "401": "No token, or not a token of this server",
    "403": "A read-only token acting, or a cross-origin request carried by the session cookie",
    "404": "No such run or dead letter",
    "500": "The database failed; nothing was changed by halves",
}


def describe_errors(app: FastAPI) -> None:
    """The OpenAPI document as the API answers: its error envelope (never FastAPI's 422), and bearer auth."""

    def document() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = schema.setdefault("components", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.get("schemas", {}).pop(name, None)
        components.setdefault("schemas", {})["Error"] = ENVELOPE
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        for path, item in schema.get("paths", {}).items():
            for operation in item.values():
                responses = operation.setdefault("responses", {})
                responses.pop("422", None)
                for code, text in ERRORS.items():
                    responses[code] = {
                        "description": text,
                        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                    }
                if path != "/api/health":
                    operation["security"] = [{"bearer": []}]
        app.openapi_schema = schema
        return schema

    app.openapi = document  # type: ignore[method-assign]
