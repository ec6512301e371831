"""The published OpenAPI document: the statuses each route really answers, and the limits of the
models this server really serves.

FastAPI alone documents a 422 that never comes (validation errors are 400s in the OpenAI shape)
and knows nothing of the statuses raised by handlers and middleware. Routes declare theirs with
`server.errors.documented(...)`. The rest depends on what is served, so `install` builds the
document per server:
- the image request becomes one schema per served model, with that model's sizes, step and guidance
  limits (the first is the default when `model` is left out);
- chat is documented only when a served model chats;
- 401 and the bearer scheme appear only when API keys are configured;
- `lora` names, per model, the adapters loaded for it (null where it serves none, or has none loaded); the routes
  that load and delete adapters exist, and so are documented, only with `--enable-lora` or `--lora`.
The models' limits are known once they are loaded, so the document is cached from `/ready` on, and built again
when an adapter is loaded or deleted (`forget`).
"""
from __future__ import annotations

import copy
import re

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from rfserve.model_zoo.base import ModelCard
from rfserve.server.errors import describe
from rfserve.server.schemas import LoraChoice
from rfserve.server.security import is_open

IMAGE_REQUEST = "ImageGenerationRequest"
CHAT_PATH = "/v1/chat/completions"


def install(app: FastAPI, engine) -> None:
    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
        _drop_unsent_422(schema)
        cards = list(engine.cards.values())
        chat = [name for name, model in engine.models.items() if model.chat is not None]
        if cards:
            _narrow_image_request(schema, cards, engine.config, _loras(engine))
        if chat:
            _narrow_chat_request(schema, chat)
        else:
            schema["paths"].pop(CHAT_PATH, None)
        if engine.config.api_keys:
            _document_auth(schema, engine.config.protect_metrics)
        if engine.ready.is_set():
            app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend the schema


def _drop_unsent_422(schema: dict) -> None:
    for operations in schema["paths"].values():
        for op in operations.values():
            op["responses"].pop("422", None)
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)


def _constrain(prop: dict, **constraints) -> None:
    """Narrow a property; for an optional one (`anyOf [X, null]`), its non-null branch."""
    for branch in prop.get("anyOf", [prop]):
        if branch.get("type") != "null":
            branch.update(constraints)


def forget(app: FastAPI) -> None:
    """The document is built again on its next request: what a request may name in `lora` changed."""
    app.openapi_schema = None


def _loras(engine) -> dict[str, list[str] | None]:
    """Per model, the adapters a request may name now; None where the model serves none."""
    return {name: [a.name for a in engine.adapters.listing(name)] if name in engine.adapters.pipelines else None
            for name in engine.cards}


def _lora_schema(card: ModelCard, names: list[str] | None, per_request: int) -> dict:
    if not names:
        why = "serves no LoRA adapters" if names is None else "has no LoRA adapter loaded (POST /v1/loras)"
        return {"type": "null", "description": f"{card.name} {why}"}
    choice = LoraChoice.model_json_schema()                 # its scale's range as the request model checks it
    choice["properties"]["name"] = {"type": "string", "enum": names}
    return {"anyOf": [{"type": "string", "enum": names},
                      {"type": "array", "items": choice, "maxItems": per_request}, {"type": "null"}],
            "description": f"LoRA adapters loaded for {card.name}: a name, or a list of {{name, scale}} "
                           f"(each name once); several combine as diffusers' set_adapters does"}


def _narrow_image_request(schema: dict, cards: list[ModelCard], config, loras: dict[str, list[str] | None]) -> None:
    components = schema["components"]["schemas"]
    generic = components.pop(IMAGE_REQUEST)
    props = generic["properties"]
    _constrain(props["n"], maximum=config.max_images_per_request)
    _constrain(props["timeout"], maximum=config.max_request_timeout_s)
    refs = []
    for i, card in enumerate(cards):
        variant = copy.deepcopy(generic)
        variant["title"] = f"{IMAGE_REQUEST} for {card.name}"
        p, d = variant["properties"], card.defaults
        if i == 0:
            p["model"] = {"anyOf": [{"type": "string", "const": card.name}, {"type": "null"}],
                          "default": None, "description": "this model is the default when left out"}
        else:
            p["model"] = {"type": "string", "const": card.name}
            variant["required"] = [*variant["required"], "model"]
        _constrain(p["size"], enum=list(card.sizes))
        p["size"]["default"] = d.size
        _constrain(p["num_inference_steps"], maximum=card.max_steps)
        p["num_inference_steps"]["default"] = d.steps
        _constrain(p["guidance_scale"], maximum=card.max_guidance)
        p["guidance_scale"]["default"] = d.guidance
        if not card.supports_negative_prompt:
            p["negative_prompt"] = {"type": "null", "description": f"{card.name} takes no negative prompt"}
        p["lora"] = _lora_schema(card, loras[card.name], config.lora.per_request)
        name = f"{IMAGE_REQUEST}.{re.sub(r'[^A-Za-z0-9._-]', '_', card.name)}"
        components[name] = variant
        refs.append({"$ref": f"#/components/schemas/{name}"})
    body = schema["paths"]["/v1/images/generations"]["post"]["requestBody"]["content"]["application/json"]
    body["schema"] = refs[0] if len(refs) == 1 else {"oneOf": refs}


def _narrow_chat_request(schema: dict, chat: list[str]) -> None:
    request = schema["components"]["schemas"]["ChatCompletionRequest"]
    request["properties"]["model"] = {"anyOf": [{"type": "string", "enum": chat}, {"type": "null"}],
                                      "default": None, "description": f"{chat[0]} when left out"}


def _document_auth(schema: dict, protect_metrics: bool) -> None:
    schema["components"].setdefault("securitySchemes", {})["bearer"] = {"type": "http", "scheme": "bearer"}
    for path, operations in schema["paths"].items():
        if is_open(path, protect_metrics):
            continue
        for op in operations.values():
            op["security"] = [{"bearer": []}]
            op["responses"]["401"] = {"description": describe(401), "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
