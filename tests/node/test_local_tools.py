"""Tools on local models: the Hermes format (rendered by the builtin model's template, parsed
back out of streamed text), and a forced tool call by constrained decoding on the builtin model."""

from __future__ import annotations

import json

import pytest
import trio

import protocol
from node._calls import CallOptions, request_fields
from node.provider.backends import TransformersBackend
from node.provider.backends._builtin_model import ensure_builtin_model
from node.provider.backends._tool_format import HermesParser, ParsedCall, parse_call, template_messages
from tests.node.session_rig import _MODELS

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Oslo"]},
                                                    "celsius": {"type": "boolean"}},
                   "required": ["city", "celsius"]}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"]}}}
OUTPUT = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris",  "celsius": true}}\n'
          '</tool_call>\n<tool_call>\n{"arguments": {"zone": "UTC"}, "name": "get_time"}\n</tool_call>\n')


def _parse(text: str, size: int) -> list:
    parser, out = HermesParser(), []
    for at in range(0, len(text), size):
        out += parser.feed(text[at:at + size])
    out += parser.close()
    return out


@pytest.mark.parametrize("size", [1, 2, 5, 11, 1000])
def test_hermes_calls_are_parsed_however_the_stream_splits_them(size):
    out = _parse(OUTPUT, size)
    text = "".join(e for e in out if isinstance(e, str))
    calls = [e for e in out if isinstance(e, ParsedCall)]
    assert text == "Let me check. "  # no markup, no layout whitespace between or after the calls
    assert calls == [ParsedCall("get_weather", '{"city": "Paris",  "celsius": true}'),  # as the model wrote it
                     ParsedCall("get_time", '{"zone": "UTC"}')]


@pytest.mark.parametrize("body", ['{"name": "f", "arguments": {"a": 1}', '[1, 2]', '{"arguments": {}}',
                                  '{"name": "f", "arguments": "x"}', '{"name": "' + "n" * 65 + '"}', "not json"])
def test_a_malformed_call_stays_text_markup_included(body):
    text = f"a <tool_call>{body}</tool_call> b"
    for size in (1, 3, 1000):
        assert _parse(text, size) == [text] or "".join(_parse(text, size)) == text


def test_an_unfinished_call_and_a_lone_angle_bracket_stay_text():
    assert "".join(_parse('x <tool_call>\n{"name": "f", "argu', 4)) == 'x <tool_call>\n{"name": "f", "argu'
    assert "".join(_parse("1 < 2 <tool", 1)) == "1 < 2 <tool"
    assert parse_call('{"name": "f"}') == ParsedCall("f", "{}")


def test_tool_call_arguments_reach_templates_as_objects():
    msgs = [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}},
        {"id": "call_2", "type": "function", "function": {"name": "g", "arguments": "not json"}}]}]
    calls = template_messages(msgs)[0]["tool_calls"]
    assert calls[0]["function"]["arguments"] == {"a": 1} and calls[1]["function"]["arguments"] == "not json"
    assert msgs[0]["tool_calls"][0]["function"]["arguments"] == '{"a": 1}'  # the caller's messages untouched


@pytest.fixture(scope="module")
def builtin():
    backend = TransformersBackend("builtin", ensure_builtin_model(_MODELS))
    trio.run(backend.start)
    return backend


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris", "celsius": true}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21"},
]


def test_the_builtin_template_renders_tools_calls_and_results_in_the_hermes_format(builtin):
    rendered = builtin._tokenizer.apply_chat_template(template_messages(CONVERSATION), tools=[WEATHER],
                                                      tokenize=False, add_generation_prompt=True)
    assert rendered.startswith("<|im_start|>system\nBe brief.\n\n# Tools")
    assert "<tools>\n" + json.dumps(WEATHER["function"], separators=(",", ":")) + "\n</tools>" in rendered
    assert ('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
            '"celsius": true}}\n</tool_call><|im_end|>\n') in rendered
    assert "<|im_start|>tool\n<tool_response>\nsunny, 21\n</tool_response><|im_end|>\n" in rendered
    assert rendered.endswith("<|im_start|>assistant\n")
    assert rendered.count("Be brief.") == 1
    assert "tools" in builtin.features()


async def test_the_prompt_with_tools_costs_its_template_and_stays_within_the_request_bound(builtin):
    options = CallOptions(tools=(WEATHER, CLOCK))
    with_tools = await builtin.count_prompt_tokens(CONVERSATION, options)
    assert with_tools > await builtin.count_prompt_tokens(CONVERSATION) + 300
    request = protocol.RequestV2(session_id=bytes(16), call_seq=0, max_tokens=8, stop=(), stream=True,
                                 **request_fields(CONVERSATION, options))
    assert with_tools <= protocol.request_token_bound(request)


def _valid_call(name: str, arguments: str) -> None:
    args = json.loads(arguments)
    if name == "get_weather":
        assert set(args) == {"city", "celsius"} and args["city"] in ("Paris", "Rome", "Oslo")
        assert isinstance(args["celsius"], bool)
    else:
        assert name == "get_time" and args == {"zone": args["zone"]} and args["zone"] in ("UTC", "CET")


@pytest.mark.parametrize("choice,names", [({"type": "function", "function": {"name": "get_weather"}}, {"get_weather"}),
                                          ("required", {"get_weather", "get_time"})])
@pytest.mark.parametrize("temperature", [0, 1000])
async def test_a_forced_tool_call_on_the_builtin_model_is_a_schema_valid_call(builtin, choice, names, temperature):
    pieces = []

    async def on_piece(text, tokens, *, tool_calls=(), logprobs=()):
        pieces.append((text, tokens, tuple(tool_calls)))

    result = await builtin.generate(CONVERSATION[:2], max_tokens=400, temperature_milli=temperature, top_p_milli=1000,
                                    stop=(), on_piece=on_piece,
                                    options=CallOptions(tools=(WEATHER, CLOCK), tool_choice=choice, seed=3))
    deltas = [d for _, _, calls in pieces for d in calls]
    assert result.finish_reason == "stop" and result.tokens_out == sum(t for _, t, _ in pieces) <= 400
    assert "".join(t for t, _, _ in pieces) == ""  # the markup is never text
    (call,) = protocol.accumulate_tool_calls(deltas)
    assert call.id.startswith("call_") and len(call.id) == 29 and call.name in names
    _valid_call(call.name, call.arguments)


async def test_a_forced_call_to_an_unknown_function_is_refused(builtin):
    from node.provider.backends import BackendUnsupported

    async def on_piece(text, tokens, **extras):
        raise AssertionError("nothing is generated")

    with pytest.raises(BackendUnsupported, match="nope"):
        await builtin.generate(CONVERSATION[:2], max_tokens=10, temperature_milli=0, top_p_milli=1000, stop=(),
                               on_piece=on_piece, options=CallOptions(
                                   tools=(WEATHER,), tool_choice={"type": "function", "function": {"name": "nope"}}))


async def test_a_template_without_tools_claims_none_and_refuses_them(tmp_path):
    import shutil

    from node.provider.backends import BackendUnsupported

    folder = tmp_path / "plain-chatml"
    shutil.copytree(ensure_builtin_model(_MODELS), folder)
    (folder / "chat_template.jinja").write_text(
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    backend = TransformersBackend(f"transformers:{folder}", folder)
    await backend.start()
    assert "tools" not in backend.features() and "json" in backend.features()
    with pytest.raises(BackendUnsupported, match="does not render tools"):
        await backend.count_prompt_tokens(CONVERSATION[:2], CallOptions(tools=(WEATHER,)))
    # tool_choice "none": the tools are not needed, so the call is served as plain chat
    assert await backend.count_prompt_tokens(CONVERSATION[:2], CallOptions(tools=(WEATHER,), tool_choice="none")) > 0


@pytest.mark.parametrize("properties", [0, 30])
async def test_128_tools_stay_within_the_request_bound(builtin, properties):
    """Many tools: the template's per-tool wrapper and spacing stay within the bound's per-tool
    share (the 512-token preamble share hid this with two tools)."""
    props = {f"p{i}": {"type": "integer"} for i in range(properties)}
    params = {"parameters": {"type": "object", "properties": props}} if properties else {}
    tools = tuple({"type": "function", "function": {"name": f"f{i}", **params}} for i in range(128))
    messages = [{"role": "user", "content": "hi"}]
    options = CallOptions(tools=tools)
    counted = await builtin.count_prompt_tokens(messages, options)
    request = protocol.RequestV2(session_id=bytes(16), call_seq=0, max_tokens=8, stop=(), stream=True,
                                 **request_fields(messages, options))
    assert counted <= protocol.request_token_bound(request)


async def test_a_forced_call_whose_parameters_have_a_pattern_is_refused_before_anything_runs(builtin):
    from node.provider.backends import BackendUnsupported

    costly = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"p": {"type": "string", "pattern": "^([a-z]{1,100}){1,100}x$"}}}}}
    options = CallOptions(tools=(costly,), tool_choice="required")
    with pytest.raises(BackendUnsupported, match="patterns are not supported"):
        await builtin.count_prompt_tokens(CONVERSATION[:2], options)

    async def on_piece(text, tokens, **extras):
        raise AssertionError("nothing is generated")

    with pytest.raises(BackendUnsupported, match="patterns are not supported"):
        await builtin.generate(CONVERSATION[:2], max_tokens=10, temperature_milli=0, top_p_milli=1000, stop=(),
                               on_piece=on_piece, options=options)
    # the same tool offered, not forced: its schema only reaches the template, never the enforcer
    assert await builtin.count_prompt_tokens(CONVERSATION[:2], CallOptions(tools=(costly,))) > 0


def test_a_call_of_a_function_not_offered_stays_text():
    """The wire carries only calls of offered tools (the forced one when named): a model naming another
    function wrote text, and it goes out as text, markup included."""
    parser = HermesParser(frozenset({"get_time"}))
    events = parser.feed(OUTPUT) + parser.close()
    assert [e.name for e in events if isinstance(e, ParsedCall)] == ["get_time"]
    assert '<tool_call>\n{"name": "get_weather"' in "".join(e for e in events if isinstance(e, str))


NOTE = {"type": "function", "function": {"name": "take_note", "parameters": {
    "type": "object", "properties": {"note": {"type": "string", "minLength": 300, "maxLength": 320}},
    "required": ["note"]}}}  # a call longer than the 256 tokens held inside an unfinished call


@pytest.mark.parametrize("tool", [WEATHER, NOTE], ids=["short", "long"])
@pytest.mark.parametrize("seed", [1, 2])
async def test_logprobs_of_a_tool_call_stay_within_what_the_call_bills(builtin, seed, tool):
    """A forced call's markup tokens bill nothing (no wire bytes): their logprobs wait for bytes that
    bill them and the rest are dropped, so the consumer's rule (logprobs <= claimed + TOKEN_SLACK)
    holds after every piece."""
    sent = {"tokens": 0, "bytes": 0, "lps": 0}

    async def on_piece(text, tokens, *, tool_calls=(), logprobs=()):
        sent["tokens"] += tokens
        sent["bytes"] += len(text.encode()) + sum(len((d.id + d.name + d.arguments).encode()) for d in tool_calls)
        sent["lps"] += len(logprobs)
        claimed = protocol.billable_output_tokens(sent["tokens"], sent["bytes"])
        assert sent["lps"] <= claimed + protocol.TOKEN_SLACK, sent

    result = await builtin.generate(CONVERSATION[:2], max_tokens=600, temperature_milli=1000, top_p_milli=1000,
                                    stop=(), on_piece=on_piece,
                                    options=CallOptions(tools=(tool,), tool_choice="required", seed=seed,
                                                        logprobs=True, top_logprobs=2))
    assert result.finish_reason == "stop" and sent["lps"] > 0
