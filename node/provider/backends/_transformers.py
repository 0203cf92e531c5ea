"""The ``transformers:PATH`` (and ``builtin``) backend: a local Hugging Face model folder, generated
in a worker thread with exact token counts. torch and transformers are imported on load only.

Cancellation: a cancelled ``generate`` (the consumer cancelled the call or went away) stops the
model at its next token and returns once the worker thread has ended."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Sequence

import trio

from ._base import Backend, BackendError, Generation, OnPiece

__all__ = ["TransformersBackend"]

_logger = logging.getLogger(__name__)


class _Cancelled(Exception):
    pass


# transformers builds a model under a process-wide context (weights first on the "meta" device):
# two loads in two threads at once break each other ("Cannot copy out of meta tensor; no data!",
# seen when the demo's three providers loaded the builtin model together). One load at a time.
_LOADING = threading.Lock()


class TransformersBackend(Backend):
    """A local Hugging Face model folder, loaded with ``from_pretrained(..., local_files_only=True)``."""

    def __init__(self, spec: str, folder: Path) -> None:
        self.spec = spec
        self.folder = folder
        self._tokenizer: Any = None
        self._model: Any = None
        self._device = "cpu"
        self._lock = trio.Lock()  # one generation at a time on this model

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

        try:
            await trio.to_thread.run_sync(load)
        except Exception as exc:
            raise BackendError(f"cannot load a model from {self.folder}: {exc}") from exc

    def _prompt_ids(self, messages: Sequence[dict[str, str]]) -> Any:
        encoded = self._tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, return_tensors="pt",
                                                      return_dict=True)
        return encoded["input_ids"]

    def footprint_mb(self) -> int | None:
        if self._model is None:
            return None
        return sum(p.numel() * p.element_size() for p in self._model.parameters()) // (1 << 20) + 1

    def on_gpu(self) -> bool:
        return self._device == "cuda"

    async def count_prompt_tokens(self, messages: Sequence[dict[str, str]]) -> int:
        ids = await trio.to_thread.run_sync(self._prompt_ids, messages)
        return int(ids.shape[1])

    async def generate(self, messages: Sequence[dict[str, str]], *, max_tokens: int, temperature_milli: int,
                       top_p_milli: int, stop: Sequence[str], on_piece: OnPiece) -> Generation:
        if max_tokens <= 0:
            return Generation("length", 0)
        async with self._lock:
            return await self._generate(messages, max_tokens, temperature_milli, top_p_milli, stop, on_piece)

    async def _generate(self, messages: Sequence[dict[str, str]], max_tokens: int, temperature_milli: int,
                        top_p_milli: int, stop: Sequence[str], on_piece: OnPiece) -> Generation:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        tokenizer, cancel = self._tokenizer, threading.Event()
        state = {"ids": [], "sent_text": "", "sent_tokens": 0, "stopped": False}
        send, receive = trio.open_memory_channel[tuple[str, int] | None](max_buffer_size=1024)
        token = trio.lowlevel.current_trio_token()

        def emit(final: bool) -> None:
            text = tokenizer.decode(state["ids"], skip_special_tokens=True)
            for s in stop:
                at = text.find(s, max(0, len(state["sent_text"]) - len(s)))
                if at >= 0:
                    text, state["stopped"] = text[:at], True
                    cancel.set()
            if not final and not state["stopped"] and text.endswith("\ufffd"):
                return  # an unfinished multi-byte character: wait for its other bytes
            new = text[len(state["sent_text"]):]
            tokens = len(state["ids"]) - state["sent_tokens"]
            if new or tokens:
                state["sent_text"], state["sent_tokens"] = text, len(state["ids"])
                trio.from_thread.run_sync(send.send_nowait, (new, tokens), trio_token=token)

        class Streamer(BaseStreamer):
            prompt_seen = False

            def put(self, value: Any) -> None:
                if not self.prompt_seen:
                    self.prompt_seen = True
                    return
                if cancel.is_set():
                    raise _Cancelled
                state["ids"].extend(int(t) for t in value.reshape(-1).tolist() if int(t) not in eos_ids)
                emit(final=False)

            def end(self) -> None:
                pass

        class Stop(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool, device=input_ids.device)

        eos = self._model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])

        def run() -> str:
            ids = self._prompt_ids(messages).to(self._device)
            sampling = temperature_milli > 0
            kwargs: dict[str, Any] = {"do_sample": sampling, "max_new_tokens": max_tokens}
            if sampling:
                kwargs.update(temperature=temperature_milli / 1000, top_p=top_p_milli / 1000)
            else:
                kwargs.update(temperature=None, top_p=None)
            try:
                with torch.inference_mode():
                    out = self._model.generate(ids, attention_mask=torch.ones_like(ids), streamer=Streamer(),
                                               stopping_criteria=StoppingCriteriaList([Stop()]), **kwargs)
            except _Cancelled:
                return "stop"
            finally:
                emit(final=True)
                trio.from_thread.run_sync(send.send_nowait, None, trio_token=token)
            generated = out.shape[1] - ids.shape[1]
            ended_on_eos = generated > 0 and int(out[0, -1]) in eos_ids
            return "stop" if state["stopped"] or ended_on_eos or generated < max_tokens else "length"

        result: dict[str, Any] = {}

        async def worker() -> None:
            try:
                result["finish"] = await trio.to_thread.run_sync(run)
            except Exception as exc:  # torch raises many types
                result["error"] = exc
                send.send_nowait(None)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(worker)
            try:
                async for item in receive:
                    if item is None:
                        break
                    await on_piece(*item)
            finally:
                # cancelled (the consumer cancelled or went away) or failed: stop the model at its
                # next token, here, before the nursery waits for its thread
                cancel.set()
        if "error" in result:
            raise BackendError(f"generation failed: {result['error']}") from result["error"]
        return Generation(result["finish"], state["sent_tokens"])
