"""The request bodies of the OpenAI face, declared: what this network reads of OpenAI's chat
completion, legacy completion and embeddings requests. Every other field is ignored, as OpenAI
ignores what it does not know (``Body``: ``extra="ignore"``, strict JSON types).

Rules:
- Every field is bounded as the wire bounds it (``protocol.RequestV2``, ``EmbedRequest``): a body
  that passes here fits the wire field by field; the call as a whole is then checked by building
  the request it sends (``consumer._request_check``).
- What cannot be served is refused here, with one clear line naming the field: ``n`` > 1 (one
  answer a call, one receipt), ``functions``/``function_call`` (OpenAI's deprecated form: send
  ``tools``), image or audio content parts, ``top_logprobs`` without ``logprobs``, a
  ``tool_choice`` naming a function ``tools`` does not define; for legacy completions ``echo``,
  ``best_of`` > 1, ``suffix`` and a list of several prompts; for embeddings token-id arrays
  (``input`` as integers: the providers' tokenizers differ, so ids mean nothing across them).
- Accepted without effect: ``parallel_tool_calls`` (a model may make several calls in one turn
  either way; ``false`` is passed on to no one), ``frequency_penalty``, ``presence_penalty``,
  ``logit_bias``, ``metadata``, ``store`` and the rest of OpenAI's knobs (ignored as unknown).
- ``options()`` turns a body into ``_calls.CallOptions`` (OpenAI shapes kept as they came).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

import protocol

from .._calls import CallOptions
from ..consumer import Preferences
from ._http import (
    MAX_MESSAGES,
    Body,
    Budget,
    MaxTokens,
    ModelName,
    PeerId,
    PricePer1K,
    Sort,
    WireText,
    _max_bytes,
)

__all__ = ["ChatMessage", "ChatRequest", "CompletionRequest", "EmbeddingsRequest", "ProviderPrefs", "MaxPrice",
           "ToolDef", "ResponseFormat", "MAX_EMBED_REQUEST_INPUTS", "ROLES"]

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MAX_EMBED_REQUEST_INPUTS = 2048  # OpenAI's own bound on one embeddings request's inputs
_MAX_SCHEMA = 65536  # bytes of canonical JSON: the wire's bound on a tool's parameters and on json_schema

FunctionName = Annotated[str, _max_bytes(64, 1)]
ToolCallId = Annotated[str, _max_bytes(64)]
Name = Annotated[str, _max_bytes(64)]
Description = Annotated[str, _max_bytes(8192)]
User = Annotated[str, _max_bytes(256)]
Seed = Annotated[int, Field(ge=0, le=(1 << 64) - 1)]
Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(ge=0, le=1)]


# ---- shared pieces -------------------------------------------------------------------------------


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ValueError("only text content parts are supported (no images, audio or files)")
            parts.append(part["text"])
        return "".join(parts)
    if content is None:
        return ""
    raise ValueError("message content must be a string or a list of text parts")


_WIRE_TEXT = TypeAdapter(WireText)


def _wire_text(value: str) -> str:
    try:
        return _WIRE_TEXT.validate_python(value)
    except ValidationError as exc:
        raise ValueError(exc.errors(include_url=False)[0]["msg"].removeprefix("Value error, ")) from None


def _stop(value: Any) -> tuple[str, ...]:
    stop = value or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or len(stop) > 4 or not all(
            isinstance(s, str) and len(s.encode()) <= 64 for s in stop):
        raise ValueError("stop is a string or up to 4 strings, each at most 64 bytes")  # the wire's bounds
    return tuple(stop)


def _json_size(value: Any) -> Any:
    if value is not None:
        try:
            n = len(protocol.canonical_json(value).encode())
        except (TypeError, ValueError) as exc:  # NaN, or not JSON at all
            raise ValueError(f"not plain JSON ({exc})") from None
        if n > _MAX_SCHEMA:
            raise ValueError(f"{n} bytes of JSON, over the {_MAX_SCHEMA} the wire carries")
    return value


def _refused(what: str) -> AfterValidator:
    def check(value: Any) -> Any:
        if value:
            raise ValueError(what)
        return value

    return AfterValidator(check)


def _one(value: int | None) -> int:
    if value not in (None, 1):
        raise ValueError("only n=1 is supported (one answer a call, one receipt)")
    return 1


def _single_best(value: int | None) -> int | None:
    if value not in (None, 1):
        raise ValueError("only best_of=1 is supported (one answer a call, one receipt)")
    return value


Stop = Annotated[Any, AfterValidator(_stop)]
Schema = Annotated[dict[str, Any], AfterValidator(_json_size)]


class MaxPrice(Body):  # µc per 1K tokens
    input: PricePer1K | None = None
    output: PricePer1K | None = None


class ProviderPrefs(Body):
    """Routing preferences, beyond the OpenAI format."""

    sort: Sort = "cheapest"
    max_price: MaxPrice | None = None
    only: list[PeerId] | None = Field(None, max_length=256)
    ignore: list[PeerId] | None = Field(None, max_length=256)
    allow_fallbacks: bool = True

    def preferences(self) -> Preferences:
        price = self.max_price or MaxPrice()
        return Preferences(sort=self.sort, max_input_price=price.input, max_output_price=price.output,
                           only=tuple(self.only or ()), ignore=tuple(self.ignore or ()),
                           allow_fallbacks=self.allow_fallbacks)


class StreamOptions(Body):
    include_usage: bool | None = None


class _Paid(Body):
    """What every paid call may carry beyond OpenAI's format: routing, the agent to pay through, a budget."""

    provider: ProviderPrefs | None = None
    escrow: str | None = None  # the agent to pay through (a peer id)
    budget: Budget | None = None  # µc this call may cost

    def prefs(self) -> Preferences:
        return (self.provider or ProviderPrefs()).preferences()

    def include_usage(self) -> bool:
        """Whether a stream ends with a ``usage`` chunk (``stream_options.include_usage``)."""
        options = getattr(self, "stream_options", None)
        return bool(options is not None and options.include_usage)


# ---- chat ------------------------------------------------------------------------------------------


class FunctionDef(Body):
    name: FunctionName
    description: Description | None = None
    parameters: Schema | None = None  # a JSON schema object
    strict: bool | None = None


class ToolDef(Body):
    type: Literal["function"]
    function: FunctionDef


class ToolChoiceFunction(Body):
    name: FunctionName


class NamedToolChoice(Body):
    type: Literal["function"]
    function: ToolChoiceFunction


class FunctionCallMade(Body):
    name: FunctionName
    arguments: WireText  # JSON text, as the model wrote it


class ToolCallMade(Body):
    id: ToolCallId
    type: Literal["function"] = "function"
    function: FunctionCallMade


class TextFormat(Body):
    type: Literal["text"]


class JsonObjectFormat(Body):
    type: Literal["json_object"]


class JsonSchemaSpec(Body):
    name: Annotated[str, _max_bytes(64, 1)]
    description: Description | None = None
    schema_: Schema = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class JsonSchemaFormat(Body):
    type: Literal["json_schema"]
    json_schema: JsonSchemaSpec


ResponseFormat = Annotated[TextFormat | JsonObjectFormat | JsonSchemaFormat, Field(discriminator="type")]


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[Any, AfterValidator(_text), AfterValidator(_wire_text)] = Field(
        None, validate_default=True)  # text, as one string of at most 1 MiB
    name: Name | None = None
    tool_call_id: ToolCallId | None = None  # a tool message: the call it answers
    tool_calls: list[ToolCallMade] | None = Field(None, max_length=128)  # an assistant message: the calls it made

    @model_validator(mode="after")
    def _roles(self) -> "ChatMessage":
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message names the call it answers (tool_call_id)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only an assistant message carries tool_calls")
        return self

    def wire(self) -> dict[str, Any]:
        """The message as ``_calls.request_fields`` takes it (OpenAI's shape, roles the wire carries)."""
        doc: dict[str, Any] = {"role": ROLES[self.role], "content": self.content}
        if self.name:
            doc["name"] = self.name
        if self.tool_call_id:
            doc["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            doc["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        return doc


class ChatRequest(_Paid):
    """What this network reads of OpenAI's chat completion request (the rest is ignored)."""

    model: ModelName
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    tools: list[ToolDef] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # accepted; a model may make several calls either way
    functions: Annotated[Any, _refused("functions is OpenAI's deprecated form of tools: send tools")] = None
    function_call: Annotated[Any, _refused("function_call is OpenAI's deprecated form of tool_choice: send "
                                           "tool_choice")] = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    seed: Seed | None = None
    user: User | None = None
    n: Annotated[int | None, AfterValidator(_one)] = 1
    max_completion_tokens: MaxTokens | None = None  # wins over max_tokens; neither: 256
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stop: Stop = Field(None, validate_default=True)
    stream: bool | None = False
    stream_options: StreamOptions | None = None

    @field_validator("top_logprobs")
    @classmethod
    def _with_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    @field_validator("tool_choice")
    @classmethod
    def _a_defined_tool(cls, value: Any, info: ValidationInfo) -> Any:
        names = {t.function.name for t in info.data.get("tools") or ()}
        if isinstance(value, NamedToolChoice) and value.function.name not in names:
            raise ValueError(f"names function {value.function.name!r}, which tools does not define")
        if value == "required" and not names:
            raise ValueError("'required' needs tools to choose from")
        return value

    def limit(self) -> int:
        return next((v for v in (self.max_completion_tokens, self.max_tokens) if v is not None), 256)

    def wire_messages(self) -> list[dict[str, Any]]:
        return [m.wire() for m in self.messages]

    def options(self) -> CallOptions:
        choice: Any = self.tool_choice.model_dump() if isinstance(self.tool_choice, NamedToolChoice) else \
            self.tool_choice
        fmt = self.response_format.model_dump(by_alias=True, exclude_none=True) if self.response_format else None
        if fmt == {"type": "text"}:
            fmt = None
        return CallOptions(tools=tuple(t.model_dump(exclude_none=True) for t in self.tools or ()), tool_choice=choice,
                           response_format=fmt, seed=self.seed, logprobs=bool(self.logprobs),
                           top_logprobs=self.top_logprobs or 0, user=self.user or "")


# ---- legacy completions ------------------------------------------------------------------------------


def _prompt(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
        return value[0]
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        raise ValueError("one prompt a request (a list of several is not supported: one answer, one receipt)")
    if isinstance(value, list) and value and all(isinstance(v, (int, list)) and not isinstance(v, bool)
                                                 for v in value):
        raise ValueError("token-id prompts are not supported (providers' tokenizers differ): send text")
    raise ValueError("prompt is a string (or a list of one string)")


class CompletionRequest(_Paid):
    """What this network reads of OpenAI's legacy completion request (``/v1/completions``)."""

    model: ModelName
    prompt: Annotated[Any, AfterValidator(_prompt), AfterValidator(_wire_text)]
    max_tokens: MaxTokens = 16  # OpenAI's default for this endpoint
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stop: Stop = Field(None, validate_default=True)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None  # legacy: how many alternatives per token
    seed: Seed | None = None
    user: User | None = None
    n: Annotated[int | None, AfterValidator(_one)] = 1
    echo: Annotated[bool | None, _refused("echo is not supported (the prompt is not billed as output)")] = None
    best_of: Annotated[int | None, AfterValidator(_single_best)] = None
    suffix: Annotated[str | None, _refused("suffix (insertion) is not supported")] = None

    def options(self) -> CallOptions:
        return CallOptions(prompt=self.prompt, seed=self.seed, logprobs=self.logprobs is not None,
                           top_logprobs=self.logprobs or 0, user=self.user or "")


# ---- embeddings --------------------------------------------------------------------------------------


def _inputs(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        if len(value) > MAX_EMBED_REQUEST_INPUTS:
            raise ValueError(f"{len(value)} inputs, over the {MAX_EMBED_REQUEST_INPUTS} one request takes")
        return tuple(_wire_text(v) for v in value)
    if isinstance(value, list) and value and all(isinstance(v, (int, list)) and not isinstance(v, bool)
                                                 for v in value):
        raise ValueError("token-id inputs are not supported (providers' tokenizers differ): send text")
    if isinstance(value, list) and not value:
        raise ValueError("at least one text to embed")
    raise ValueError("input is a string or a list of strings")


class EmbeddingsRequest(_Paid):
    """What this network reads of OpenAI's embeddings request."""

    model: ModelName
    input: Annotated[Any, AfterValidator(_inputs)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1, le=protocol.MAX_EMBED_DIMS)] | None = None
    user: User | None = None
