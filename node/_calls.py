"""What an agent's call asks beyond plain chat, and how it maps between OpenAI's JSON shapes and
the wire (``protocol.RequestV2``): the consumer builds the request with ``request_fields``, the
provider reads it back with ``from_request``, and both faces report tool calls and logprobs in
OpenAI's shape with ``openai_tool_calls`` / ``openai_logprobs``.

Rules:
- A call that asks nothing beyond plain chat travels as a v1 ``Request`` (old providers keep
  working); anything else as ``RequestV2`` (the consumer machine chooses).
- JSON that travels (tool parameter schemas, the ``json_schema`` format) travels as
  ``protocol.canonical_json`` text, so the request hash in the receipt covers exactly it and both
  sides hash the same bytes.
- ``needs()`` names the listing features a call needs: a consumer routes only to offers that list
  them, and a provider refuses a call whose needs its offer does not list.
- Logprobs travel as integer micro-nats (``neg_logprob_micro``); only the faces turn them into
  OpenAI's floats, for display.
Pure: no I/O, no clock.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Sequence

import protocol

__all__ = ["CallOptions", "request_fields", "from_request", "openai_tool_calls", "openai_logprobs"]

_CHOICES = ("none", "auto", "required")


@dataclasses.dataclass(frozen=True)
class CallOptions:
    """What a call asks beyond messages, max_tokens, temperature, top_p and stop (OpenAI shapes)."""

    tools: tuple[dict[str, Any], ...] = ()  # {"type": "function", "function": {name, description?, parameters?, strict?}}
    tool_choice: str | dict[str, Any] | None = None  # "none" | "auto" | "required" | {"type": "function", "function": {"name"}}
    response_format: dict[str, Any] | None = None  # {"type": "text" | "json_object"} | {"type": "json_schema", "json_schema": {...}}
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    user: str = ""
    prompt: str | None = None  # legacy completion: raw text to continue (messages then empty)

    def needs(self) -> frozenset[str]:
        """The listing features (``protocol.FEATURES``) a call with these options needs."""
        needs = set()
        if self.tools and self.tool_choice != "none":
            needs.add("tools")
        if self.json_schema() is not None:
            needs.add("json")
        if self.logprobs:
            needs.add("logprobs")
        if self.prompt is not None:
            needs.add("completions")
        return frozenset(needs)

    def forced_tool(self) -> str | None:
        """The function the model must call: its name when ``tool_choice`` names one, ``"*"`` for
        ``"required"`` (any of the tools), else None."""
        if not self.tools:
            return None
        if self.tool_choice == "required":
            return "*"
        if isinstance(self.tool_choice, dict):
            return (self.tool_choice.get("function") or {}).get("name")
        return None

    def json_schema(self) -> dict[str, Any] | None:
        """The schema the output must satisfy: ``json_schema``'s schema, ``{}`` for ``json_object``
        (any JSON object), None when the output is free text."""
        fmt = self.response_format or {}
        if fmt.get("type") == "json_object":
            return {}
        if fmt.get("type") == "json_schema":
            spec = fmt.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            return dict(schema) if isinstance(schema, dict) else {}
        return None

    def tool_named(self, name: str) -> dict[str, Any] | None:
        """The ``function`` object of the tool called ``name``, if offered."""
        for tool in self.tools:
            fn = tool.get("function") or {}
            if fn.get("name") == name:
                return fn
        return None


# ---- consumer: OpenAI shapes -> the wire ---------------------------------------------------


def _wire_choice(choice: str | dict[str, Any] | None) -> str:
    if choice is None:
        return ""
    if isinstance(choice, str):
        if choice not in _CHOICES:
            raise ValueError(f"tool_choice must be one of {', '.join(_CHOICES)} or a function, not {choice!r}")
        return choice
    name = (choice.get("function") or {}).get("name") if isinstance(choice, dict) else None
    if not isinstance(name, str) or not name:
        raise ValueError('tool_choice names a function as {"type": "function", "function": {"name": N}}')
    return "function:" + name


def _wire_tool(tool: dict[str, Any]) -> Any:
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ValueError('each tool is {"type": "function", "function": {"name": N, ...}}')
    params = fn.get("parameters")
    return protocol.Tool(name=fn["name"], description=fn.get("description") or "",
                         parameters="" if params is None else protocol.canonical_json(params),
                         strict=bool(fn.get("strict") or False))


def _wire_turn(m: dict[str, Any]) -> Any:
    calls = tuple(
        protocol.ToolCall(id=c.get("id") or "", name=(c.get("function") or {}).get("name") or "",
                          arguments=(c.get("function") or {}).get("arguments") or "")
        for c in (m.get("tool_calls") or ()))
    return protocol.Turn(role=m["role"], content=m.get("content") or "", name=m.get("name") or "",
                         tool_call_id=m.get("tool_call_id") or "", tool_calls=calls)


def request_fields(messages: Sequence[dict[str, Any]], options: CallOptions) -> dict[str, Any]:
    """Keyword arguments for ``ConsumerSession.request``: the messages as ``protocol.Turn``s and
    every extra of ``options`` in its wire form.

    Raises:
        ValueError: an option in a shape the wire cannot carry (the message names it).
    """
    fmt = options.response_format or {}
    kind = fmt.get("type") or "text"
    if kind not in ("text", "json_object", "json_schema"):
        raise ValueError(f"response_format type must be text, json_object or json_schema, not {kind!r}")
    schema = ""
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            raise ValueError('response_format json_schema is {"type": "json_schema", "json_schema": {"name": N, '
                             '"schema": {...}}}')
        schema = protocol.canonical_json(spec)
    return dict(
        messages=tuple(_wire_turn(m) for m in messages),
        tools=tuple(_wire_tool(t) for t in options.tools),
        tool_choice=_wire_choice(options.tool_choice),
        response_format="" if kind == "text" else kind,
        json_schema=schema,
        seed=options.seed,
        logprobs=options.logprobs,
        top_logprobs=options.top_logprobs,
        user=options.user,
        prompt=options.prompt,
    )


# ---- provider: the wire -> OpenAI shapes ---------------------------------------------------


def _openai_message(m: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"role": m.role, "content": m.content}
    if getattr(m, "name", ""):
        doc["name"] = m.name
    if getattr(m, "tool_call_id", ""):
        doc["tool_call_id"] = m.tool_call_id
    if getattr(m, "tool_calls", ()):
        doc["tool_calls"] = openai_tool_calls(m.tool_calls)
    return doc


def _openai_tool(t: Any) -> dict[str, Any]:
    fn: dict[str, Any] = {"name": t.name}
    if t.description:
        fn["description"] = t.description
    if t.parameters:
        fn["parameters"] = _json_object(t.parameters, f"tool {t.name}'s parameters")
    if t.strict:
        fn["strict"] = True
    return {"type": "function", "function": fn}


def from_request(request: Any) -> tuple[list[dict[str, Any]], CallOptions]:
    """A v1 or v2 call request as OpenAI-shaped messages and the options it asks for.

    Raises:
        ValueError: JSON text in the request (a tool's parameters, the schema) does not parse, is
            nested too deep, or is not an object where one is needed: a remote consumer sent it,
            so every such shape is this one error, never another exception.
    """
    try:
        return _from_request(request)
    except (TypeError, AttributeError, KeyError, RecursionError, json.JSONDecodeError) as exc:
        raise ValueError(f"the request's JSON is malformed: {type(exc).__name__}: {str(exc)[:120]}") from exc


def _json_object(text: str, what: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError(f"{what} is not a JSON object")
    return value


def _from_request(request: Any) -> tuple[list[dict[str, Any]], CallOptions]:
    messages = [_openai_message(m) for m in request.messages]
    if not isinstance(request, protocol.RequestV2):
        return messages, CallOptions()
    choice: str | dict[str, Any] | None = request.tool_choice or None
    if isinstance(choice, str) and choice.startswith("function:"):
        choice = {"type": "function", "function": {"name": choice.removeprefix("function:")}}
    fmt: dict[str, Any] | None = None
    if request.response_format == "json_object":
        fmt = {"type": "json_object"}
    elif request.response_format == "json_schema":
        spec = _json_object(request.json_schema, "the json_schema format")
        if not isinstance(spec.get("schema", {}), dict):
            raise ValueError("the json_schema format's schema is not a JSON object")
        fmt = {"type": "json_schema", "json_schema": spec}
    tools = tuple(_openai_tool(t) for t in request.tools)
    return messages, CallOptions(tools=tools, tool_choice=choice, response_format=fmt, seed=request.seed,
                                 logprobs=request.logprobs, top_logprobs=request.top_logprobs, user=request.user,
                                 prompt=request.prompt)


# ---- both faces: results in OpenAI's shape ------------------------------------------------


def openai_tool_calls(calls: Sequence[Any]) -> list[dict[str, Any]]:
    """Accumulated ``protocol.ToolCall``s as OpenAI's ``message.tool_calls``."""
    return [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls]


def _logprob(micro: int) -> float:
    return -micro / 1_000_000


def openai_logprobs(lps: Sequence[Any]) -> dict[str, Any]:
    """``protocol.TokenLogprob``s as OpenAI's chat ``logprobs`` object."""
    return {"content": [
        {"token": t.token, "logprob": _logprob(t.neg_logprob_micro), "bytes": list(t.token.encode()),
         "top_logprobs": [{"token": o.token, "logprob": _logprob(o.neg_logprob_micro), "bytes": list(o.token.encode())}
                          for o in t.top]}
        for t in lps], "refusal": None}
