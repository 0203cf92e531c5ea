"""The ``llamacpp:PATH`` backend: a GGUF model through llama-cpp-python (an optional extra:
``pip install llama-cpp-python``; it compiles for minutes). Generation runs token by token in a
worker thread under our own loop, so ``max_tokens`` is exact and every token is counted; text is
decoded incrementally and never split inside a UTF-8 character. A cancelled ``generate`` stops
the model at its next token.

Options: a legacy ``prompt`` is continued raw (no template); ``seed`` seeds the sampler; tools,
JSON output and logprobs are refused (``BackendUnsupported``): its features are streaming and
completions."""

from __future__ import annotations

import codecs
import threading
from pathlib import Path
from typing import Any, Sequence

import trio

import protocol

from ..._calls import CallOptions
from ._base import Backend, BackendError, BackendUnsupported, Generation, OnPiece
from ._commitment import file_commitment

__all__ = ["LlamaCppBackend"]

_NO_OPTIONS = CallOptions()


class LlamaCppBackend(Backend):
    def __init__(self, spec: str, path: Path, n_ctx: int = 4096) -> None:
        self.spec = spec
        self.path = path
        self.n_ctx = n_ctx
        self._llm: Any = None
        self._format: Any = None
        self._lock = trio.Lock()
        self._commitment: protocol.ModelCommitment | None = None

    def commitment(self) -> protocol.ModelCommitment | None:
        return self._commitment

    async def start(self) -> None:
        try:
            import llama_cpp
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter
        except ImportError as exc:
            raise BackendError("the llamacpp backend needs the optional extra: pip install llama-cpp-python") from exc

        def load() -> None:
            llm = llama_cpp.Llama(model_path=str(self.path), n_ctx=self.n_ctx, verbose=False)
            template = llm.metadata.get("tokenizer.chat_template")
            if not template:
                raise BackendError(f"{self.path} carries no chat template")
            eos = llm.detokenize([llm.token_eos()], special=True).decode(errors="replace")
            bos_id = llm.token_bos()
            bos = llm.detokenize([bos_id], special=True).decode(errors="replace") if bos_id >= 0 else ""
            self._format = Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
            self._llm = llm
            self._commitment = file_commitment(self.path)

        try:
            await trio.to_thread.run_sync(load)
        except BackendError:
            raise
        except Exception as exc:
            raise BackendError(f"cannot load {self.path}: {exc}") from exc

    def features(self) -> tuple[str, ...]:
        return ("streaming", "completions")

    def _check(self, options: CallOptions) -> None:
        asked = options.needs() - set(self.features())
        if asked:
            raise BackendUnsupported(f"{self.spec}: the llamacpp backend does not support {', '.join(sorted(asked))}")

    def _prompt(self, messages: Sequence[dict[str, Any]], options: CallOptions = _NO_OPTIONS) -> list[int]:
        if options.prompt is not None:
            return self._llm.tokenize(options.prompt.encode(), add_bos=True, special=False)
        prompt = self._format(messages=list(messages)).prompt
        return self._llm.tokenize(prompt.encode(), add_bos=False, special=True)

    async def count_prompt_tokens(self, messages: Sequence[dict[str, Any]], options: CallOptions = _NO_OPTIONS) -> int:
        self._check(options)
        async with self._lock:
            return len(await trio.to_thread.run_sync(self._prompt, messages, options))

    async def generate(self, messages: Sequence[dict[str, Any]], *, max_tokens: int, temperature_milli: int,
                       top_p_milli: int, stop: Sequence[str], on_piece: OnPiece,
                       options: CallOptions = _NO_OPTIONS) -> Generation:
        self._check(options)
        if max_tokens <= 0:
            return Generation("length", 0)
        async with self._lock:
            send, receive = trio.open_memory_channel[tuple[str, int] | None](1024)
            token = trio.lowlevel.current_trio_token()
            cancel = threading.Event()
            result: dict[str, Any] = {}

            def run() -> None:
                llm, eos = self._llm, self._llm.token_eos()
                decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
                text, pending, produced, finish = "", 0, 0, "length"
                try:
                    llm.reset()
                    if options.seed is not None:
                        llm.set_seed(options.seed)
                    for tok in llm.generate(self._prompt(messages, options), temp=temperature_milli / 1000,
                                            top_p=top_p_milli / 1000, reset=True):
                        if cancel.is_set() or tok == eos:
                            finish = "stop"
                            break
                        produced += 1
                        pending += 1
                        new = decoder.decode(llm.detokenize([tok]))
                        hit = next((s for s in stop if s in text + new), None)
                        if hit is not None:
                            new = (text + new)[: (text + new).index(hit)][len(text):]
                            finish = "stop"
                        if new or hit is not None:
                            text += new
                            trio.from_thread.run_sync(send.send_nowait, (new, pending), trio_token=token)
                            pending = 0
                        if hit is not None or produced >= max_tokens:
                            break
                    tail = decoder.decode(b"", final=True)
                    if tail or pending:
                        trio.from_thread.run_sync(send.send_nowait, (tail, pending), trio_token=token)
                    result["generation"] = Generation(finish, produced)
                except Exception as exc:  # llama.cpp errors come as several types
                    result["error"] = exc
                finally:
                    trio.from_thread.run_sync(send.send_nowait, None, trio_token=token)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, run)
                try:
                    async for item in receive:
                        if item is None:
                            break
                        await on_piece(*item)
                finally:
                    cancel.set()  # cancelled or failed: the thread stops at its next token, before we wait for it
            if "error" in result:
                raise BackendError(f"llama.cpp generation failed: {result['error']}") from result["error"]
            return result["generation"]
