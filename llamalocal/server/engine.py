"""The one thread that runs the model: admitted completions, in arrival order, one at a time.

The model has one context, so completions take turns on it; what a turn leaves in the KV cache
is reused by the next prompt that starts the same way. A job's events (text pieces, the end of
each choice, the usage) go to its request's coroutine through `emit`. Between any two tokens
(and between prompt batches) the job checks whether its client is gone (`cancel`: it stops at
once) and whether the server is shutting down (`Engine.stop`: each choice ends with
finish_reason "length", so a stream still gets its last chunk and [DONE]).

When the model can no longer run (an RPC worker holding some of its layers is lost), the
running job is likely stuck inside llama.cpp for good: ggml's RPC calls have no timeout.
`Engine.abandon` then answers for it and for every queued or later job (`Lost`), from the
thread that noticed, and leaves the engine's thread where it is.

Text is decoded from each token's whole bytes (`native.token_piece`; llama-cpp-python's own
detokenize drops tokens longer than 32 bytes) with an incremental UTF-8 decoder, so a
character split over byte tokens comes out whole, and stop strings are held back until they
can no longer match (llamalocal.chat.StopFilter, as `chat` does).
"""

from __future__ import annotations

import codecs
import queue
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from llamalocal.server.config import PENALTY_LAST_N
from llamalocal.server.prompts import Prepared
from llamalocal.server.requests import Sampling

# ---------------------------------------------------------------------------------------------
# What a job reports
# ---------------------------------------------------------------------------------------------


@dataclass
class Piece:
    index: int  # the choice
    text: str


@dataclass
class Finished:
    index: int
    reason: str  # OpenAI's finish_reason: "stop" (end of text, a stop string, the grammar done) or "length"
    tokens: int


@dataclass
class Done:
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    message: str


@dataclass
class Lost:
    """The model can no longer run (`message` says why); nothing more will come for this job."""

    message: str


Event = Piece | Finished | Done | Failed | Lost


class Job:
    """One admitted completion request: `n` choices from one prompt."""

    def __init__(self, prepared: Prepared, sampling: Sampling, n: int, gbnf: str | None,
                 emit: Callable[[Event], None]) -> None:
        self.prepared = prepared
        self.sampling = sampling
        self.n = n
        self.gbnf = gbnf
        self.emit = emit
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        """The client is gone: stop at the next token and report nothing more."""
        self.cancelled.set()


# ---------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------

class Engine:
    def __init__(self, llm: Any, *, log: Callable[[str], None] = lambda text: None) -> None:
        from llamalocal.convert import native

        self.llm = llm
        self.log = log
        self.n_vocab = native.vocab_info(llm.model)[0]
        self.stopping = threading.Event()
        self.generated = 0  # tokens generated since start (GET /health shows it)
        self.lost: str | None = None  # why the model can no longer run (Engine.abandon)
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._current: Job | None = None  # the job the thread is running
        self._lock = threading.Lock()  # lost, _current and the queue change together
        self._thread = threading.Thread(target=self._run, name="llamalocal-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        with self._lock:
            if self.lost is not None:
                job.emit(Lost(self.lost))
                return
            self._jobs.put(job)

    def stop(self) -> None:
        """Shutting down: the running job's choices end after their current token, queued ones at once."""
        self.stopping.set()

    def abandon(self, why: str) -> None:
        """The model can no longer run: the running job, the queued ones and any submitted from
        now on end at once with Lost(why). Safe from any thread; the engine's thread is not waited
        for (it may never come back from llama.cpp), and runs nothing more if it does."""
        with self._lock:
            if self.lost is not None:
                return
            self.lost = why
            doomed = [self._current] if self._current is not None else []
            while True:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    doomed.append(job)
            self._jobs.put(None)  # the thread leaves, if it ever takes another job
        for job in doomed:
            job.cancel()
            job.emit(Lost(why))

    def close(self, timeout: float) -> bool:
        """Stop the thread; True once it has left (the model may then be freed). After `abandon`
        the thread is not waited for: False at once."""
        self.stop()
        self._jobs.put(None)
        if self.lost is not None:
            return False
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            with self._lock:
                if job is None or self.lost is not None:
                    return  # abandon() answered every job that was queued
                if job.cancelled.is_set():
                    continue
                self._current = job
            try:
                self._complete(job)
            except Exception as e:  # a bug or a llama.cpp failure: this request fails, the server goes on
                self.llm.n_tokens = 0  # the cache may not hold what we think: evaluate afresh next time
                self.log(f"error in a completion:\n{traceback.format_exc()}")
                job.emit(Failed(f"the completion failed: {type(e).__name__}: {e}"))
            finally:
                with self._lock:
                    self._current = None

    # -----------------------------------------------------------------------------------------

    def _halted(self, job: Job) -> bool:
        return job.cancelled.is_set() or self.stopping.is_set()

    def _complete(self, job: Job) -> None:
        prompt = job.prepared.prompt
        total = 0
        for index in range(job.n):
            if job.cancelled.is_set():
                return
            reason, produced = self._choice(job, index)
            if job.cancelled.is_set():
                return
            total += produced
            job.emit(Finished(index, reason, produced))
        job.emit(Done(len(prompt), total))

    def _choice(self, job: Job, index: int) -> tuple[str, int]:
        """Generate one choice; (finish_reason, tokens generated)."""
        from llamalocal.chat import StopFilter
        from llamalocal.convert import native

        llm, prep, s = self.llm, job.prepared, job.sampling
        if self._halted(job) or not self._prefill(job, prep.prompt):
            return "length", 0
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = StopFilter(prep.stops)
        started = not prep.strip_leading
        produced = 0
        reason = "length"

        def out(text: str) -> None:
            nonlocal started
            if not started:
                text = text.lstrip()
                started = bool(text)
            if text:
                job.emit(Piece(index, text))

        with native.Sampler(llm.model, llm.ctx, temp=s.temperature, top_k=s.top_k, top_p=s.top_p, min_p=s.min_p,
                            typical_p=s.typical_p, repeat_penalty=s.repeat_penalty,
                            frequency_penalty=s.frequency_penalty, presence_penalty=s.presence_penalty,
                            penalty_last_n=PENALTY_LAST_N, seed=None if s.seed is None else s.seed + index,
                            grammar=job.gbnf, logit_bias=s.logit_bias) as sampler:
            while produced < prep.limit:
                if self._halted(job):
                    break
                token = sampler.sample()
                if token is None or native.is_eog(llm.model, token):
                    reason = "stop"  # the model ended its text, or the grammar allows nothing more
                    break
                sampler.accept(token)
                produced += 1
                self.generated += 1
                out(stops.feed(decoder.decode(native.token_piece(llm.model, token))))
                if stops.stopped:
                    reason = "stop"
                    break
                if produced < prep.limit:
                    llm.eval([token])
        if not stops.stopped:
            out(stops.feed(decoder.decode(b"", final=True)))
            if not stops.stopped:
                out(stops.flush())
        return reason, produced

    def _prefill(self, job: Job, tokens: list[int]) -> bool:
        """Evaluate `tokens` after whatever prefix of them the KV cache still holds, a batch at a
        time; False if the job was halted before the last batch."""
        llm = self.llm
        n = 0
        for a, b in zip(llm.input_ids[: llm.n_tokens].tolist(), tokens, strict=False):
            if a != b:
                break
            n += 1
        n = min(n, len(tokens) - 1)  # the last prompt token is decoded again for its logits
        llm.n_tokens = n  # llm.eval drops the cache from here on
        step = max(1, int(llm.n_batch))
        for start in range(n, len(tokens), step):
            if self._halted(job):
                return False
            llm.eval(tokens[start:start + step])
        return True
