"""The ``transformers:PATH`` (and ``builtin``) backend: a local Hugging Face model folder, decoded
token by token in a worker thread with exact token counts. torch and transformers are imported
on load only.

What a call may ask (``CallOptions``), and how it is served:
- ``tools`` and tool turns are rendered by the model's own chat template
  (``apply_chat_template(messages, tools=...)``); tool calls are parsed back out of the output
  only in the Hermes format (``<tool_call>`` JSON, see ``_tool_format``), when the template writes
  it; other formats stay text. A template that never mentions ``tools`` does not claim "tools".
- ``response_format`` json_object / json_schema, and ``tool_choice`` "required" or a named
  function, are served by constrained decoding (``_constrained``, lm-format-enforcer); a forced
  call is a Hermes call whose arguments satisfy the tool's parameters, returned as a tool call.
- ``logprobs``/``top_logprobs``: the log-probabilities of the distribution each token was drawn
  from (after suppressed tokens, the constraint, temperature and top_p), as ``-logprob × 10^6``.
- ``seed``: every call samples with its own ``torch.Generator`` (seeded with ``seed``, or at
  random), so a seeded call repeats its output and calls never share random state.
- ``prompt`` (legacy completion): the raw text is tokenized and continued, no template.
- ``stop`` strings cut the text (the stop string is not sent) and end the generation; text that
  may be the start of a stop string is held back until the next token settles it.

The decoding loop is our own (a forward pass with the KV cache per token): its sampler is
temperature and top_p, the generation config's ``suppress_tokens`` are never drawn, and its
eos tokens end the output. Cancellation: a cancelled ``generate`` (the consumer cancelled the
call or went away) stops the model before its next token, or inside a constrained step's search
for the allowed tokens (``_constrained``), and returns once the worker thread has ended; one
forward pass of the model is not interrupted. A constrained step over its time fails the call
(``BackendError``); a constraint that cannot continue ends the output with finish "length".

Text is decoded incrementally (``_Detokenizer``): each step decodes a window of the newest
tokens from a checkpoint, so a step costs its new tokens, not the whole output.
"""

from __future__ import annotations

import inspect
import logging
import math
import secrets
import threading
from pathlib import Path
from typing import Any, Sequence

import trio

import protocol

from ..._calls import CallOptions
from ._base import CHAT_FEATURES, MODEL_LOADING, Backend, BackendError, BackendUnsupported, Generation, OnPiece
from ._commitment import folder_commitment
from ._constrained import (
    Constraint,
    ConstraintFailed,
    ConstraintStopped,
    TokenizerData,
    check_call_schema,
    tool_call_schema,
)
from ._tool_format import HermesParser, ParsedCall, new_call_id, template_messages, uses_hermes

__all__ = ["TransformersBackend"]

_logger = logging.getLogger(__name__)
_NO_OPTIONS = CallOptions()
_MAX_NEG_MICRO = (1 << 40) - 1
_FLUSH_TOKENS = 256  # tokens held back (inside an unfinished tool call) before they are claimed anyway


_LOADING = MODEL_LOADING  # one load at a time in the process (see _base)


class TransformersBackend(Backend):
    """A local Hugging Face model folder, loaded with ``from_pretrained(..., local_files_only=True)``."""

    def __init__(self, spec: str, folder: Path) -> None:
        self.spec = spec
        self.folder = folder
        self._tokenizer: Any = None
        self._model: Any = None
        self._device = "cpu"
        self._eos: set[int] = set()
        self._suppressed: list[int] = []
        self._renders_tools = False
        self._hermes = False
        self._tokdata: TokenizerData | None = None
        self._cache_arg = "past_key_values"
        self._lock = trio.Lock()  # one generation at a time on this model
        self._commitment: protocol.ModelCommitment | None = None

    async def start(self) -> None:
        def load() -> None:
            import torch
            import transformers
            from transformers import AutoModelForCausalLM, AutoTokenizer

            transformers.utils.logging.set_verbosity_error()
            transformers.utils.logging.disable_progress_bar()

            self._device = "cuda" if torch.cuda.is_available() else "cpu"
            with _LOADING:
                self._tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
                self._model = AutoModelForCausalLM.from_pretrained(self.folder, local_files_only=True).to(self._device)
            self._model.eval()
            # transformers 5.x renamed the KV cache argument (past_key_values -> cache)
            self._cache_arg = "cache" if "cache" in inspect.signature(self._model.forward).parameters else "past_key_values"
            config = self._model.generation_config
            eos = config.eos_token_id if config.eos_token_id is not None else self._tokenizer.eos_token_id
            self._eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
            self._suppressed = [int(t) for t in (config.suppress_tokens or ())]
            template = self._tokenizer.chat_template
            self._renders_tools = "tools" in str(template or "")
            self._hermes = self._renders_tools and uses_hermes(template)
            self._tokdata = TokenizerData(self._tokenizer, sorted(self._eos), self._suppressed)
            self._commitment = folder_commitment(self.folder)

        try:
            await trio.to_thread.run_sync(load)
        except Exception as exc:
            raise BackendError(f"cannot load a model from {self.folder}: {exc}") from exc

    def features(self) -> tuple[str, ...]:
        return tuple(f for f in CHAT_FEATURES if f != "tools" or self._renders_tools)

    def footprint_mb(self) -> int | None:
        if self._model is None:
            return None
        return sum(p.numel() * p.element_size() for p in self._model.parameters()) // (1 << 20) + 1

    def on_gpu(self) -> bool:
        return self._device == "cuda"

    def commitment(self) -> protocol.ModelCommitment | None:
        return self._commitment

    def reproducible(self) -> bool:
        # greedy decoding on the CPU runs the same kernels in the same order every time; GPU
        # kernels may reduce in another order (and flip a near-tie), so a GPU says no
        return self._device == "cpu"

    def _check(self, options: CallOptions) -> None:
        """Refuse what this model cannot serve, before anything runs.

        Raises:
            BackendUnsupported: the option, named.
        """
        if options.tools and options.tool_choice != "none" and not self._renders_tools:
            raise BackendUnsupported(f"{self.spec}: this model's chat template does not render tools")
        forced = options.forced_tool()
        if forced is not None:
            if not self._hermes:
                raise BackendUnsupported(f"{self.spec}: forcing a tool call needs a chat template in the Hermes "
                                         "<tool_call> format")
        check_call_schema(options)  # the forced function is among the tools; the schema is cheap and satisfiable

    def _prompt_ids(self, messages: Sequence[dict[str, Any]], options: CallOptions) -> list[int]:
        tok = self._tokenizer
        if options.prompt is not None:
            ids = list(tok(options.prompt, add_special_tokens=True)["input_ids"])
            start = tok.bos_token_id if tok.bos_token_id is not None else min(self._eos, default=0)
            return ids or [start]  # an empty prompt continues from the start token
        try:
            encoded = tok.apply_chat_template(template_messages(messages), tools=list(options.tools) or None,
                                              add_generation_prompt=True, return_dict=True)
        except Exception as exc:  # jinja2 raises its own types for a template the messages do not fit
            raise BackendUnsupported(f"{self.spec}: the chat template cannot render these messages: "
                                     f"{str(exc)[:200]}") from exc
        ids = encoded["input_ids"]
        return [int(i) for i in (ids[0] if ids and isinstance(ids[0], list) else ids)]

    async def count_prompt_tokens(self, messages: Sequence[dict[str, Any]], options: CallOptions = _NO_OPTIONS) -> int:
        self._check(options)
        return len(await trio.to_thread.run_sync(self._prompt_ids, messages, options))

    def _constraint(self, options: CallOptions) -> Constraint | None:
        assert self._tokdata is not None
        forced = options.forced_tool()
        if forced is not None:
            return Constraint(self._tokdata, tool_schema=tool_call_schema(options.tools, forced))
        schema = options.json_schema()
        if schema is not None:
            return Constraint(self._tokdata, schema=schema)
        return None

    async def generate(self, messages: Sequence[dict[str, Any]], *, max_tokens: int, temperature_milli: int,
                       top_p_milli: int, stop: Sequence[str], on_piece: OnPiece,
                       options: CallOptions = _NO_OPTIONS) -> Generation:
        self._check(options)
        if max_tokens <= 0:
            return Generation("length", 0)
        async with self._lock:
            constraint = await trio.to_thread.run_sync(self._constraint, options)
            return await self._generate(messages, options, constraint, max_tokens, temperature_milli, top_p_milli,
                                        stop, on_piece)

    async def _generate(self, messages: Sequence[dict[str, Any]], options: CallOptions, constraint: Constraint | None,
                        max_tokens: int, temperature_milli: int, top_p_milli: int, stop: Sequence[str],
                        on_piece: OnPiece) -> Generation:
        cancel = threading.Event()
        send, receive = trio.open_memory_channel[tuple[str, int, tuple, tuple] | None](max_buffer_size=256)
        token = trio.lowlevel.current_trio_token()
        forced = options.forced_tool()
        offered = frozenset((t.get("function") or {}).get("name") for t in options.tools)
        parser = (HermesParser(offered if forced in (None, "*") else frozenset({forced}))
                  if self._hermes and options.tools and options.tool_choice != "none" and options.prompt is None
                  else None)

        def push(item: tuple[str, int, tuple, tuple] | None) -> None:
            """Hand a piece to the event loop; the model waits while the consumer is slow (backpressure)."""
            try:
                trio.from_thread.run(send.send, item, trio_token=token)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                cancel.set()  # the receiving side is gone: stop at the next token

        emitter = _Emitter(self._tokenizer, stop, parser, push)
        want = (options.logprobs, min(max(options.top_logprobs, 0), 20))

        def run() -> str:
            try:
                return self._decode(self._prompt_ids(messages, options), constraint, max_tokens,
                                    temperature_milli / 1000, top_p_milli / 1000, options.seed, want, emitter, cancel)
            finally:
                push(None)

        result: dict[str, Any] = {}

        async def worker() -> None:
            try:
                result["finish"] = await trio.to_thread.run_sync(run)
            except Exception as exc:  # torch raises many types
                result["error"] = exc

        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker)
            try:
                async for item in receive:
                    if item is None:
                        break
                    text, tokens, calls, lps = item
                    extras: dict[str, Any] = {}
                    if calls:
                        extras["tool_calls"] = calls
                    if lps:
                        extras["logprobs"] = lps
                    await on_piece(text, tokens, **extras)
            finally:
                # cancelled (the consumer cancelled or went away) or failed: stop the model at its
                # next token, here, before the nursery waits for its thread (closing the channel
                # frees a thread waiting to hand over a piece)
                cancel.set()
                receive.close()
        if "error" in result:
            if isinstance(result["error"], BackendError):
                raise result["error"]
            raise BackendError(f"generation failed: {result['error']}") from result["error"]
        return Generation(result["finish"], emitter.sent_tokens)

    def _decode(self, prompt: list[int], constraint: Constraint | None, max_tokens: int, temperature: float,
                top_p: float, seed: int | None, want: tuple[bool, int], emitter: _Emitter,
                cancel: threading.Event) -> str:
        """The decoding loop (worker thread): returns the finish reason."""
        import torch

        device = self._device
        generator = torch.Generator(device=device)
        generator.manual_seed(seed if seed is not None else secrets.randbits(63))
        generated: list[int] = []
        finish = "length"
        with torch.inference_mode():
            out = self._model(input_ids=torch.tensor([prompt], device=device), use_cache=True)
            try:
                for step in range(max_tokens):
                    if cancel.is_set():
                        finish = "stop"
                        break
                    logits = out.logits[0, -1, :].float()
                    if self._suppressed:
                        logits[self._suppressed] = -math.inf
                    if constraint is not None:
                        try:
                            allowed = constraint.allowed(cancel.is_set)
                        except ConstraintStopped:
                            finish = "stop"
                            break
                        except ConstraintFailed as exc:  # the output cannot be completed: not a clean stop
                            _logger.warning("%s: constrained decoding ended the output early: %s", self.spec, exc)
                            break
                        mask = torch.full_like(logits, -math.inf)
                        mask[allowed] = 0.0
                        logits = logits + mask
                        if not bool(torch.isfinite(logits).any()):  # every allowed token is suppressed
                            _logger.warning("%s: constrained decoding ended the output early: only suppressed "
                                            "tokens may follow", self.spec)
                            break
                    if temperature > 0:
                        logits = _top_p(logits / temperature, top_p)
                        choice = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=generator))
                    else:
                        choice = int(torch.argmax(logits))
                    lp = self._logprob(logits, choice, want[1]) if want[0] else None
                    if choice in self._eos:
                        finish = "stop"
                        break
                    generated.append(choice)
                    if emitter.step(generated, lp):
                        finish = "stop"  # a stop string
                        break
                    if constraint is not None:
                        try:
                            constraint.feed(choice)
                        except ConstraintFailed as exc:
                            _logger.warning("%s: constrained decoding ended the output early: %s", self.spec, exc)
                            break
                    if step + 1 < max_tokens:
                        out = self._model(input_ids=torch.tensor([[choice]], device=device), use_cache=True,
                                          **{self._cache_arg: _cache_of(out)})
            finally:
                emitter.finish(generated)
        return finish

    async def topk_agreement(self, messages: Sequence[dict[str, Any]], text: str, k: int) -> tuple[int, int]:
        """How many of ``text``'s tokens (as this tokenizer splits it) are, each after the prompt and
        the tokens before it, among this model's ``k`` most likely next tokens (suppressed tokens
        never are): ``(agreeing, total)``. One forward pass, no sampling: a spot check's comparison
        where greedy decoding is not reproducible bit for bit."""
        if self._model is None:
            raise BackendError(f"{self.spec} is not started")

        def score() -> tuple[int, int]:
            import torch

            prompt = self._prompt_ids(messages, _NO_OPTIONS)
            output = list(self._tokenizer(text, add_special_tokens=False)["input_ids"])
            if not output:
                return 0, 0
            with torch.inference_mode():
                out = self._model(input_ids=torch.tensor([prompt + output], device=self._device))
                logits = out.logits[0, len(prompt) - 1:-1, :].float()
                if self._suppressed:
                    logits[:, self._suppressed] = -math.inf
                top = torch.topk(logits, min(k, logits.shape[-1]), dim=-1).indices
                hits = (top == torch.tensor(output, device=self._device).unsqueeze(-1)).any(-1)
            return int(hits.sum()), len(output)

        async with self._lock:
            return await trio.to_thread.run_sync(score)

    def _logprob(self, logits: Any, choice: int, top: int) -> protocol.TokenLogprob:
        import torch

        logp = torch.log_softmax(logits, -1)
        alts = []
        if top:
            values, ids = torch.topk(logp, min(top, logp.shape[0]))
            alts = [protocol.TopLogprob(token=self._token_text(int(i)), neg_logprob_micro=_micro(float(v)))
                    for v, i in zip(values.tolist(), ids.tolist()) if v > -math.inf]
        return protocol.TokenLogprob(token=self._token_text(choice), neg_logprob_micro=_micro(float(logp[choice])),
                                     top=tuple(alts))

    def _token_text(self, token_id: int) -> str:
        text = self._tokenizer.decode([token_id])
        return text.encode()[:256].decode(errors="ignore")


def _stop_prefix(text: str, stops: Sequence[str]) -> int:
    """The length of the longest end of ``text`` that is a proper start of one of ``stops``."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best


def _cache_of(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _micro(logprob: float) -> int:
    if logprob == -math.inf or logprob != logprob:
        return _MAX_NEG_MICRO
    return min(_MAX_NEG_MICRO, max(0, round(-logprob * 1_000_000)))


def _top_p(logits: Any, top_p: float) -> Any:
    """``logits`` with every token outside the smallest set whose probability reaches ``top_p`` at -inf."""
    import torch

    if top_p >= 1.0:
        return logits
    ordered, order = torch.sort(logits, descending=True)
    cumulative = torch.softmax(ordered, -1).cumsum(-1)
    drop = cumulative - torch.softmax(ordered, -1) >= top_p  # the mass before a token already reaches top_p
    drop[0] = False
    out = logits.clone()
    out[order[drop]] = -math.inf
    return out


class _Detokenizer:
    """Incremental decoding (as vLLM's): each step decodes a window of the newest tokens only,
    from a checkpoint (``_prefix``) whose text is already known, so a step costs its window, not
    the whole output. Both decodes of a step start at the checkpoint, so what a tokenizer does at
    the start of a text (a dropped leading space) cancels out. Text that ends inside a UTF-8
    character waits for the rest, for at most ``_MAX_PENDING`` tokens (then it goes out as is)."""

    _MAX_PENDING = 16

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._prefix = 0  # the window starts here
        self._read = 0  # tokens before this are text already given out

    def step(self, ids: list[int], final: bool) -> str:
        """The new text that ``ids`` (the whole output so far) settles."""
        if len(ids) == self._read:
            return ""
        known = self._tok.decode(ids[self._prefix:self._read], skip_special_tokens=True)
        text = self._tok.decode(ids[self._prefix:], skip_special_tokens=True)
        pending = len(ids) - self._read
        if not final and pending < self._MAX_PENDING and (text.endswith("\ufffd") or len(text) <= len(known)):
            return ""  # an unfinished character, or tokens with no text yet
        self._prefix, self._read = self._read, len(ids)
        return text[len(known):]


class _Emitter:
    """Turns the growing token list into pieces (worker thread): incremental text that never ends
    inside a UTF-8 character, cut at a stop string, split into text and tool calls by the Hermes
    parser when the call offers tools; each piece carries the tokens (and logprobs) since the last."""

    def __init__(self, tokenizer: Any, stop: Sequence[str], parser: HermesParser | None, send: Any) -> None:
        self._detok, self._stop, self._parser, self._send = _Detokenizer(tokenizer), tuple(s for s in stop if s), \
            parser, send
        self._held = ""  # decoded text held back: it may be the start of a stop string
        self._tokens = 0  # tokens not yet claimed by a piece
        self._lps: list[protocol.TokenLogprob] = []
        self.sent_tokens = 0
        self._sent_bytes = 0  # metered bytes sent (text, and a call's id, name and arguments)
        self._sent_lps = 0
        self._calls = 0
        self._stopped = False

    def step(self, generated: list[int], lp: protocol.TokenLogprob | None) -> bool:
        """One more token; True when a stop string ended the output."""
        self._tokens += 1
        if lp is not None:
            self._lps.append(lp)
        self._emit(generated, final=False)
        return self._stopped

    def finish(self, generated: list[int]) -> None:
        if not self._stopped:
            self._emit(generated, final=True)

    def _emit(self, generated: list[int], final: bool) -> None:
        text = self._held + self._detok.step(generated, final)
        cut = min((at for at in (text.find(s) for s in self._stop) if at >= 0), default=-1)
        if cut >= 0:  # the held text was searched before: it holds no whole stop string, so this one is new
            text, self._stopped = text[:cut], True
        final = final or self._stopped
        keep = 0 if final else _stop_prefix(text, self._stop)  # an end that may yet become a stop string waits
        new, self._held = text[:len(text) - keep], text[len(text) - keep:]
        if not new and not final and self._tokens < _FLUSH_TOKENS:
            return
        if self._parser is None:
            events: list[str | ParsedCall] = [new] if new else []
        else:
            events = self._parser.feed(new) + (self._parser.close() if final else [])
        for event in events:
            if isinstance(event, str):
                self._piece(event, ())
            else:
                delta = protocol.ToolCallDelta(index=self._calls, id=new_call_id(), name=event.name,
                                               arguments=event.arguments)
                self._calls += 1
                self._piece("", (delta,))
        if self._tokens and (final or self._tokens >= _FLUSH_TOKENS):
            self._piece("", ())

    def _piece(self, text: str, calls: tuple) -> None:
        """Send a piece with the tokens since the last and their logprobs — as many as the consumer
        takes: a call's logprobs never pass its billed tokens + ``TOKEN_SLACK`` (billed tokens are at
        most the metered bytes + ``TOKEN_SLACK``). Those of tokens that bill nothing yet (inside an
        unfinished tool call) wait for the bytes that bill them; what never gets billed (markup,
        tokens that decode to nothing) is dropped at the end."""
        tokens, self._tokens = self._tokens, 0
        self.sent_tokens += tokens
        self._sent_bytes += len(text.encode()) + sum(len((d.id + d.name + d.arguments).encode()) for d in calls)
        room = min(self.sent_tokens, self._sent_bytes + protocol.TOKEN_SLACK) + protocol.TOKEN_SLACK - self._sent_lps
        lps, self._lps = tuple(self._lps[:max(0, room)]), self._lps[max(0, room):]
        self._sent_lps += len(lps)
        for at in range(0, max(len(lps), 1), 1024):  # a chunk carries at most 1024 logprobs
            self._send((text if at == 0 else "", tokens if at == 0 else 0, calls if at == 0 else (),
                        lps[at:at + 1024]))
