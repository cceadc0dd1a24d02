"""The ingest API as an OpenAPI 3.1 document (stack/CONTRACT.md, "Ingest API"), served by
ingest at `GET /openapi.json`.

The schemas come from the types that validate and answer (qoe.contract's Event and
FieldError, the bodies below) through msgspec's JSON Schema 2020-12, the dialect of OpenAPI
3.1; what a JSON Schema cannot state (the ts window, printable targets) is in their
descriptions.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

from qoe.contract import MAX_BODY_BYTES, MAX_EVENTS, Event, FieldError

EVENTS_PATH = "/v1/events"
_REF = "#/components/schemas/{name}"


class Batch(msgspec.Struct, forbid_unknown_fields=True):
    """A request body: exactly the key "events"; at most 1 MiB in all."""

    events: Annotated[list[Event], Meta(min_length=1, max_length=MAX_EVENTS)]


class Accepted(msgspec.Struct, forbid_unknown_fields=True):
    """Every event of the batch is stored; an id repeated inside the batch counts once."""

    accepted: Annotated[int, Meta(ge=0, le=MAX_EVENTS)]
    duplicates: Annotated[
        int, Meta(ge=0, le=MAX_EVENTS, description="events JetStream already had")
    ]


class Error(msgspec.Struct, forbid_unknown_fields=True):
    """What was wrong, for a person."""

    error: str


class InvalidEvents(msgspec.Struct, forbid_unknown_fields=True):
    """The first problem of every invalid event; `field` is "" when the event is not an object."""

    error: str
    errors: Annotated[list[FieldError], Meta(min_length=1)]


# status: (when, body): the answers table of CONTRACT.md.
ANSWERS: dict[int, tuple[str, type]] = {
    202: ("JetStream acknowledged every event of the batch", Accepted),
    400: ('body not JSON, or not {"events": [...]} with 1-1000 items', Error),
    401: ("missing or wrong bearer token", Error),
    413: (f"over {MAX_EVENTS} events or over {MAX_BODY_BYTES} bytes", Error),
    415: ("Content-Type is not application/json (parameters such as charset allowed)", Error),
    422: ("one or more invalid events; nothing of the batch is published", InvalidEvents),
    503: (
        "JetStream could not acknowledge in time; some events may be stored: retry the whole "
        "batch after Retry-After seconds",
        Error,
    ),
}


def _ecma_patterns(node: Any) -> Any:
    """The schema with Python's end anchor \\Z written as ECMA-262's $ (JSON Schema regexes
    are ECMA-262, where \\Z is just "Z"; without the multiline flag $ is the end)."""
    if isinstance(node, dict):
        return {
            key: value.replace("\\Z", "$")
            if key == "pattern" and isinstance(value, str)
            else _ecma_patterns(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [_ecma_patterns(item) for item in node]
    return node


def _response(status: int, when: str, body: type) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": when,
        "content": {"application/json": {"schema": {"$ref": _REF.format(name=body.__name__)}}},
    }
    if status == 503:
        response["headers"] = {
            "Retry-After": {
                "description": "seconds to wait before retrying",
                "required": True,
                "schema": {"type": "integer", "minimum": 0},
            }
        }
    return response


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the ingest API."""
    bodies = {body for _, body in ANSWERS.values()}
    (_, components) = msgspec.json.schema_components([Batch, *bodies], ref_template=_REF)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "QoE ingest API",
            "version": "1",
            "description": "stack/CONTRACT.md, Ingest API. Checks apply in this order, the "
            "first failing one answers: token (401), content type (415), size (413), body "
            "(400, 413, 422). GET /openapi.json needs no token.",
        },
        "paths": {
            EVENTS_PATH: {
                "post": {
                    "operationId": "postEvents",
                    "summary": "Store a batch of 1-1000 measurements",
                    "security": [{"bearer": []}],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": {"$ref": _REF.format(name="Batch")}}
                        },
                    },
                    "responses": {
                        str(status): _response(status, when, body)
                        for status, (when, body) in ANSWERS.items()
                    },
                }
            }
        },
        "components": {
            "schemas": _ecma_patterns(components),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "a per-probe token from PROBE_TOKENS",
                }
            },
        },
    }
