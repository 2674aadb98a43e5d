"""Ten real-world JSON schemas (function-calling and data-extraction shapes), each with a valid
instance, for benchmarks/structured_speed.py and benchmarks/grammar_backends.py."""

from __future__ import annotations

_STR = {"type": "string"}
_INT = {"type": "integer"}

SCHEMAS: dict[str, tuple[dict, dict]] = {
    "weather_call": ({"type": "object", "properties": {
        "location": {"type": "string", "description": "City and country"},
        "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["location", "unit"], "additionalProperties": False},
        {"location": "Paris, France", "unit": "celsius"}),
    "calendar_event": ({"type": "object", "properties": {
        "title": _STR, "start": {"type": "string", "format": "date-time"}, "end": {"type": "string", "format": "date-time"},
        "attendees": {"type": "array", "items": {"type": "string", "format": "email"}, "maxItems": 20},
        "location": _STR, "reminder_minutes": {"type": "integer", "minimum": 0, "maximum": 1440}},
        "required": ["title", "start", "end", "attendees"], "additionalProperties": False},
        {"title": "Sync", "start": "2026-12-07T10:00:00Z", "end": "2026-12-07T10:30:00Z",
         "attendees": ["a@example.com"], "reminder_minutes": 10}),
    "github_issue": ({"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 256}, "body": _STR,
        "labels": {"type": "array", "items": {"enum": ["bug", "enhancement", "docs", "question"]}, "maxItems": 4},
        "assignees": {"type": "array", "items": {"type": "string", "pattern": "^[a-zA-Z0-9-]{1,39}$"}},
        "milestone": {"anyOf": [_INT, {"type": "null"}]}}, "required": ["title", "body"], "additionalProperties": False},
        {"title": "Crash on start", "body": "Steps...", "labels": ["bug"], "assignees": ["octocat"], "milestone": None}),
    "product": ({"type": "object", "properties": {
        "sku": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}, "name": _STR,
        "price": {"type": "number", "minimum": 0, "exclusiveMaximum": 100000},
        "currency": {"enum": ["USD", "EUR", "GBP"]}, "in_stock": {"type": "boolean"},
        "dimensions": {"type": "object", "properties": {"w": {"type": "number"}, "h": {"type": "number"},
                                                        "d": {"type": "number"}}, "required": ["w", "h", "d"]}},
        "required": ["sku", "name", "price", "currency", "in_stock"]},
        {"sku": "ABC-1234", "name": "Lamp", "price": 19.99, "currency": "EUR", "in_stock": True,
         "dimensions": {"w": 1, "h": 2, "d": 3}}),
    "person_address": ({"type": "object", "properties": {
        "first_name": _STR, "last_name": _STR, "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "address": {"type": "object", "properties": {"street": _STR, "city": _STR, "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                                                     "country": {"type": "string", "minLength": 2, "maxLength": 2}},
                    "required": ["street", "city", "country"]},
        "phones": {"type": "array", "items": {"type": "object", "properties": {"kind": {"enum": ["home", "work", "mobile"]},
                                                                                "number": _STR}, "required": ["kind", "number"]}}},
        "required": ["first_name", "last_name", "address"]},
        {"first_name": "Ada", "last_name": "Lovelace", "age": 36,
         "address": {"street": "1 Main St", "city": "London", "country": "GB"}, "phones": [{"kind": "home", "number": "1"}]}),
    "invoice": ({"type": "object", "properties": {
        "invoice_id": _STR, "date": {"type": "string", "format": "date"},
        "lines": {"type": "array", "minItems": 1, "items": {"type": "object", "properties": {
            "description": _STR, "quantity": {"type": "integer", "minimum": 1}, "unit_price": {"type": "number", "minimum": 0}},
            "required": ["description", "quantity", "unit_price"], "additionalProperties": False}},
        "total": {"type": "number"}, "paid": {"type": "boolean"}}, "required": ["invoice_id", "date", "lines", "total"]},
        {"invoice_id": "INV-1", "date": "2026-12-07", "lines": [{"description": "x", "quantity": 2, "unit_price": 3.5}],
         "total": 7.0, "paid": False}),
    "sql_query_call": ({"type": "object", "properties": {
        "query": _STR, "params": {"type": "array", "items": {"type": ["string", "number", "boolean", "null"]}},
        "timeout_ms": {"type": "integer", "minimum": 1, "maximum": 60000}}, "required": ["query"], "additionalProperties": False},
        {"query": "select 1", "params": [1, "a", None], "timeout_ms": 500}),
    "log_entry": ({"type": "object", "properties": {
        "timestamp": {"type": "string", "format": "date-time"}, "level": {"enum": ["debug", "info", "warning", "error"]},
        "service": _STR, "message": _STR, "context": {"type": "object", "additionalProperties": {"type": "string"}}},
        "required": ["timestamp", "level", "message"]},
        {"timestamp": "2026-12-07T08:00:00Z", "level": "error", "message": "boom", "context": {"k": "v"}}),
    "geojson_feature": ({"type": "object", "properties": {
        "type": {"const": "Feature"},
        "geometry": {"type": "object", "properties": {"type": {"const": "Point"}, "coordinates": {
            "type": "array", "items": {"type": "number"}, "minItems": 2, "maxItems": 3}}, "required": ["type", "coordinates"]},
        "properties": {"type": "object"}}, "required": ["type", "geometry", "properties"]},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [2.35, 48.85]}, "properties": {"name": "Paris"}}),
    "recipe_extraction": ({"type": "object", "$defs": {"ingredient": {"type": "object", "properties": {
        "name": _STR, "amount": {"type": "number"}, "unit": {"enum": ["g", "kg", "ml", "l", "tsp", "tbsp", "cup", "piece"]}},
        "required": ["name", "amount", "unit"]}}, "properties": {
        "title": _STR, "servings": {"type": "integer", "minimum": 1, "maximum": 50},
        "ingredients": {"type": "array", "items": {"$ref": "#/$defs/ingredient"}},
        "steps": {"type": "array", "items": _STR, "minItems": 1}}, "required": ["title", "ingredients", "steps"]},
        {"title": "Tea", "servings": 1, "ingredients": [{"name": "water", "amount": 250, "unit": "ml"}], "steps": ["boil"]}),
}
