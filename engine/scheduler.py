"""One compute thread for every client: priorities, fairness, supersede, preempt, cancel.

Each request becomes a Job whose work runs as a generator on the compute thread, one unit
(a prefill chunk or a decode step) per `next()`. After every unit the scheduler picks again:
the most urgent priority first (a job that waited `age_s` competes as interactive, so nothing
starves behind a stream of completions); within it, the client that has had the least compute
time so far (fair queuing between clients: each unit's seconds are charged to its client, and
a client that comes back starts level with the least-served busy one; no account is more
than DEBT_S ahead of the least-served one: resetting light clients each time they came back,
with no such bound, starved a client that stayed busy with heavy requests, 60 s under 8
windows), and that client's oldest
job. Prefill chunks are sized from the measured prefill speed to take about `chunk_target_s`,
so another client's keystroke starts within one chunk of a long prompt. At most `max_active`
jobs hold a working K/V at once (others wait for one to finish). A job whose client is not
reading its replies (`client.writable()` false) is paused until it reads again. A background
prefill is abandoned between layers (and later resumed from its last finished chunk) when
more urgent work arrives. Finished chunks go into the prompt cache at once.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from engine import protocol as P
from engine.generate import GenerateOptions, TokenStream, check_prompt_length, decode_step
from engine.grammar import TokenMask
from engine.kv_cache import KVCache
from engine.model import Cancelled, forward
from engine.multimodal import SoftSpan, build_prompt, chunk_end, refusal, safe_prefix
from engine.prompt_cache import Match, PromptCache
from engine.runtime import Model
from engine.sampling import SamplingParams
from engine.scoring import score
from engine.speculate import Drafter, ForwardCost, PromptLookup, SpecStats, Speculator

log = logging.getLogger(__name__)

INTERACTIVE = 0  # priority of completions
WARM_PRIORITY = 1000  # warming runs after everything else
KV_ROUND = 1024  # working K/V capacity is rounded up to this (pages are touched lazily)
MAX_SCORE_CONTINUATIONS = 16
CHUNK_TARGET_S = 0.2  # a prefill chunk's wall time: another client's wait at most
FIXED_S_GUESS = 0.05  # a one-row forward here until a decode has been timed
MIN_CHUNK = 16  # smaller chunks waste the matmuls (16 rows run on the packed kernels)
CHUNK_ROUND = 16
AGE_S = 10.0  # a request waiting this long competes at interactive priority
DEBT_S = 0.1  # compute seconds a client's account may be ahead of the least-served one's (a
# window of fairness: within it compute time is shared evenly; past it, old use is forgiven,
# so a window that was busy earlier waits at most about DEBT_S more for its next unit)
MAX_ACTIVE = 4  # jobs holding a working K/V at once
COPY_UNIT = 256  # cached positions copied into a working K/V per unit
RELEASE_EVERY_S = 1.0  # the queue emptied: give freed memory back, at most this often


class Client(Protocol):
    """What the scheduler needs from a connection (`writable() -> bool` is optional: a
    client whose writable() is false is not reading, and its work waits)."""

    def send(self, msg: P.Message) -> None: ...


def _writable(client: Client) -> bool:
    w = getattr(client, "writable", None)
    return True if w is None else bool(w())


@dataclass(eq=False)
class Job:
    client: Client
    req_id: int
    kind: str  # "generate", "warm" or "score"
    ids: np.ndarray  # (n,) prompt token ids, BOS first
    priority: int
    doc: str
    opts: GenerateOptions | None  # None for warm
    arrival: float
    deadline: float | None
    seq: int
    started: bool = False
    cancel_code: str = ""  # set once: E_CANCELLED, E_SUPERSEDED, E_SHUTTING_DOWN
    runner: Iterator[None] | None = None
    match: Match | None = None
    kv: KVCache | None = None
    timings: dict[str, float] = field(default_factory=dict)
    continuations: list[list[int]] = field(default_factory=list)  # score: token ids after ids
    cont_text: list[str] = field(default_factory=list)
    spans: tuple[SoftSpan, ...] = ()  # images / audio: soft tokens at negative key ids
    task: str = ""  # what the request is for (completion, refactor, chat...): speculation stats

    @property
    def cancelled(self) -> bool:
        return bool(self.cancel_code)


class Scheduler:
    def __init__(
        self,
        model: Model,
        cache: PromptCache,
        *,
        interactive_chunk: int = 512,
        background_chunk: int = 128,
        chunk_target_s: float = CHUNK_TARGET_S,
        age_s: float = AGE_S,
        max_active: int = MAX_ACTIVE,
        draft_model: Any = None,
        speculate: bool = True,
        release_memory: Callable[[], None] | None = None,
    ) -> None:
        assert interactive_chunk > 0 and background_chunk > 0 and max_active > 0
        self.model = model
        self.cache = cache
        self.draft_model = draft_model  # an engine.assistant.Assistant, or None: prompt lookup
        self.speculate = speculate  # False: requests never draft
        self.forward_cost = ForwardCost()  # measured forward time by rows: when drafts pay
        self._accept: dict[str, float] = {}  # per request kind: where the last estimate ended
        self.spec_stats = SpecStats()
        self.interactive_chunk = interactive_chunk  # the largest chunk (a lone fast machine)
        self.background_chunk = background_chunk
        self.chunk_target_s = chunk_target_s
        self.age_s = age_s
        self.max_active = max_active
        # called when the queue empties, at most every RELEASE_EVERY_S (the daemon: glibc's
        # malloc_trim when RSS is past what the model and the cache budget explain)
        self.release_memory = release_memory
        self._released = 0.0
        # a prompt of more bytes than this cannot fit the context: refused before tokenizing
        self.max_prompt_bytes = model.config.context_length * model.tokenizer.max_token_bytes()
        # compute seconds per client (kept while it is connected, work or not), when each
        # client's last unit ended, and the clients that have no work right now
        self._served_s: weakref.WeakKeyDictionary[Client, float] = weakref.WeakKeyDictionary()
        self._last_unit: weakref.WeakKeyDictionary[Client, float] = weakref.WeakKeyDictionary()
        self._idle: weakref.WeakSet[Client] = weakref.WeakSet()
        self._chunk_tok_s = 0.0  # measured prefill speed of a chunk (EMA), for status
        self._chunk_s_per_tok = 0.0  # a chunk's seconds per token past its fixed cost (EMA)
        self._fixed_s = FIXED_S_GUESS  # a forward's cost at one row: reading every weight
        self._cv = threading.Condition()
        self._jobs: list[Job] = []  # queued and started, not finished
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._hot: KVCache | None = None  # the last job's K/V: reused without a copy if it fits
        cache.reserved = self._working_bytes  # the cache budget bounds these buffers too
        self._prefill_tok_s = 0.0
        self._decode_tok_s = 0.0
        self._served = 0
        self._evaluated = 0
        self._reused = 0

    # ------------------------------------------------------------------ client side

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="compute", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            for job in self._jobs:
                job.cancel_code = job.cancel_code or P.E_SHUTTING_DOWN
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def submit(self, client: Client, msg: P.Generate | P.Warm | P.Score) -> None:
        """Validate and queue a request; problems go back to the client as Error replies."""
        try:
            job = self._make_job(client, msg)
        except ValueError as e:
            code = P.E_TOO_LONG if "context" in str(e) else P.E_BAD_REQUEST
            _send(client, P.Error(msg.id, code, str(e)))
            return
        superseded: list[Job] = []
        with self._cv:
            if self._stopping:
                _send(client, P.Error(msg.id, P.E_SHUTTING_DOWN, "the engine is shutting down"))
                return
            if job.doc:  # a newer completion (or warm) for a document replaces older ones
                for old in self._jobs:
                    if (old.client is client and old.doc == job.doc and old.kind == job.kind
                            and not old.cancelled):
                        old.cancel_code = P.E_SUPERSEDED
                        superseded.append(old)
            self._jobs.append(job)
            self._cv.notify_all()
        for old in superseded:
            self._drop_if_unstarted(old)

    def cancel(self, client: Client, req_id: int) -> bool:
        with self._cv:
            jobs = [j for j in self._jobs if j.client is client and j.req_id == req_id]
            for job in jobs:
                job.cancel_code = job.cancel_code or P.E_CANCELLED
        for job in jobs:
            self._drop_if_unstarted(job)
        return bool(jobs)

    def cancel_client(self, client: Client) -> None:
        with self._cv:
            for job in self._jobs:
                if job.client is client:
                    job.cancel_code = job.cancel_code or P.E_CANCELLED
            self._jobs = [j for j in self._jobs if j.client is not client or j.started]
            self._cv.notify_all()

    def wake(self) -> None:
        """A client reads again (its paused work may run): look at the queue now."""
        with self._cv:
            self._cv.notify_all()

    def busy(self) -> bool:
        with self._cv:
            return bool(self._jobs)

    def status(self) -> dict[str, Any]:
        with self._cv:
            now = time.monotonic()
            queue = [
                {"id": j.req_id, "kind": j.kind, "priority": j.priority, "started": j.started,
                 "paused": not _writable(j.client), "client": getattr(j.client, "name", ""),
                 "waited_s": round(now - j.arrival, 2)}
                for j in self._jobs
            ]
        files = self.model.files
        from engine.hf import describe_source

        return {
            "backend": "builtin",
            "model": self.model.name,
            "model_arch": self.model.config.arch,
            "inputs": ["text"] + [k for k in ("image", "audio")
                                  if refusal(self.model.config, self.model.name, k) is None],
            "model_source": describe_source(files.source),
            "model_path": str(files.source),
            "model_sha256": files.source_sha256,
            "cache": self.cache.stats(),
            "kv_working_bytes": self._working_bytes(),
            "prefill_tok_s": round(self._prefill_tok_s, 1),
            "decode_tok_s": round(self._decode_tok_s, 1),
            "requests_served": self._served,
            "tokens_evaluated": self._evaluated,
            "tokens_reused": self._reused,
            "prefill_chunk": self._chunk(INTERACTIVE),
            "speculation": self.spec_stats.as_dict(),
            "drafter": ("off" if not self.speculate else "prompt lookup"
                        if self.draft_model is None else f"assistant {self.draft_model.name}"),
            "forward_ms_by_rows": self.forward_cost.snapshot(),
            "kernels": self.model.kernel_status(),
            "weights": self.model.weight_status(),
            "queue": queue,
        }

    def _make_job(self, client: Client, msg: P.Generate | P.Warm | P.Score) -> Job:
        cfg = self.model.config
        P.validate(msg)  # what came in-process (the HTTP API) is checked like a frame
        size = len(msg.prompt.encode("utf-8"))
        if isinstance(msg, P.Score):  # each continuation is tokenized after the prompt
            size += max((len(c.encode("utf-8")) for c in msg.continuations), default=0)
        if size > self.max_prompt_bytes:  # before tokenizing: that would cost ~80x its size
            raise ValueError(
                f"prompt is {size} bytes; the model's context of {cfg.context_length} tokens "
                f"holds at most {self.max_prompt_bytes} bytes")
        if isinstance(msg, P.Score):
            return self._make_score_job(client, msg)
        spans: tuple[SoftSpan, ...] = ()
        if isinstance(msg, P.Generate) and msg.media:
            prompt = build_prompt(cfg, self.model.tokenizer, self.model.name, msg.prompt,
                                  msg.media)
            ids, spans = prompt.ids, prompt.spans
        else:
            ids = np.asarray(self.model.tokenizer.encode(msg.prompt, add_bos=True),
                             dtype=np.int64)
        check_prompt_length(len(ids), cfg.context_length)
        now = time.monotonic()
        if isinstance(msg, P.Warm):
            return Job(client, msg.id, "warm", ids, WARM_PRIORITY, msg.doc, None, now, None,
                       next(self._seq))
        opts = GenerateOptions(
            max_tokens=msg.max_tokens,
            sampling=SamplingParams(msg.temperature, msg.top_k, msg.top_p, msg.seed),
            stop_strings=tuple(msg.stop),
            top_logprobs=msg.logprobs,
            speculate=msg.speculate and not msg.grammar,  # drafts are not masked
            grammar=msg.grammar,
        )
        if msg.grammar:  # compile it here, off the compute thread; GrammarError is a bad request
            TokenMask(msg.grammar, self.model.tokenizer)
        deadline = now + msg.deadline_ms / 1000 if msg.deadline_ms > 0 else None
        return Job(client, msg.id, "generate", ids, msg.priority, msg.doc, opts, now, deadline,
                   next(self._seq), spans=spans, task=msg.kind)

    def _make_score_job(self, client: Client, msg: P.Score) -> Job:
        """The prompt's tokens, and each continuation's tokens after the part of the prompt
        that every ``prompt + continuation`` tokenizes the same way."""
        if not msg.continuations:
            raise ValueError("score: no continuations")
        if len(msg.continuations) > MAX_SCORE_CONTINUATIONS:
            raise ValueError(f"score: {len(msg.continuations)} continuations; the limit is "
                             f"{MAX_SCORE_CONTINUATIONS}")
        if msg.priority < 0:
            raise ValueError(f"priority must be >= 0, got {msg.priority}")
        tok = self.model.tokenizer
        prompt = tok.encode(msg.prompt, add_bos=True)
        full = [tok.encode(msg.prompt + c, add_bos=True) for c in msg.continuations]
        m = min(_common_len(prompt, f) for f in full)
        m = max(1, min(m, min(len(f) for f in full) - 1))  # each keeps a token to score
        longest = max(len(f) for f in full)
        check_prompt_length(longest, self.model.config.context_length)
        now = time.monotonic()
        job = Job(client, msg.id, "score", np.asarray(full[0][:m], dtype=np.int64),
                  msg.priority, msg.doc, None, now, None, next(self._seq))
        job.continuations = [f[m:] for f in full]
        job.cont_text = list(msg.continuations)
        job.timings["prompt_bytes"] = len(msg.prompt.encode("utf-8"))
        return job

    def _drop_if_unstarted(self, job: Job) -> None:
        """A queued job that never ran is answered at once; a running one by the compute thread."""
        with self._cv:
            if job.started or job not in self._jobs:
                return
            self._jobs.remove(job)
        _send(job.client, P.Error(job.req_id, job.cancel_code, _cancel_message(job)))

    # ------------------------------------------------------------------ compute thread

    def _loop(self) -> None:
        while True:
            with self._cv:
                while True:
                    if self._stopping and not self._jobs:
                        return
                    job = self._pick()
                    if job is not None:
                        break
                    # nothing runnable: no work, or every client with work is not reading
                    self._cv.wait(timeout=0.5 if self._jobs else None)
                job.started = True
            t0 = time.perf_counter()
            try:
                if job.cancelled:
                    raise Cancelled()
                if job.runner is None:
                    job.runner = self._run(job)
                next(job.runner)
                self._charge(job, time.perf_counter() - t0)
                continue
            except StopIteration:
                pass
            except Cancelled:
                _send(job.client, P.Error(job.req_id, job.cancel_code or P.E_CANCELLED,
                                          _cancel_message(job)))
            except Exception as e:  # a bug must not take the engine down
                log.exception("request %s failed", job.req_id)
                _send(job.client, P.Error(job.req_id, P.E_INTERNAL, f"{type(e).__name__}: {e}"))
            self._finish(job)

    def _working_bytes(self) -> int:
        """K/V memory held outside the prompt cache: running jobs' buffers and the hot one."""
        kvs = {id(k): k for k in [self._hot, *(j.kv for j in list(self._jobs))] if k is not None}
        return sum(k.nbytes_touched for k in kvs.values())

    def _finish(self, job: Job) -> None:
        if job.match is not None:
            self.cache.release(job.match)
            job.match = None
        if job.kv is not None:
            self._hot = job.kv  # keep the freshest K/V for the next keystroke
            job.kv = None
        with self._cv:
            if job in self._jobs:
                self._jobs.remove(job)
            if not any(j.client is job.client for j in self._jobs):
                self._idle.add(job.client)  # it comes back level with the busy, no credit
            empty = not self._jobs
        now = time.monotonic()
        if empty and self.release_memory is not None and now - self._released >= RELEASE_EVERY_S:
            self._released = now
            self.release_memory()

    # ------------------------------------------------------------------ choosing

    def _urgency(self, job: Job, now: float) -> int:
        """The job's priority, or interactive once it has waited `age_s` (warming never ages)."""
        if job.kind == "generate" and now - job.arrival >= self.age_s:
            return min(job.priority, INTERACTIVE)
        return job.priority

    def _pick(self) -> Job | None:
        """The job whose unit runs next (under the lock), or None if nothing can run."""
        ready = [j for j in self._jobs if j.cancelled or _writable(j.client)]
        for j in ready:
            if j.cancelled:
                return j  # its error reply is due at once
        if not ready:
            return None
        if sum(j.started for j in self._jobs) >= self.max_active:
            started = [j for j in ready if j.started]
            ready = started or ready  # no new working K/V while enough are held
        now = time.monotonic()
        top = min(self._urgency(j, now) for j in ready)
        ready = [j for j in ready if self._urgency(j, now) == top]
        # fair queuing between clients: the least compute so far; newcomers start level and
        # win the tie (least recently served first), so they start within one unit
        clients = list(dict.fromkeys(j.client for j in ready))
        back = [c for c in clients if c in self._idle or c not in self._served_s]
        busy = [self._served_s[c] for c in clients if c not in back]
        level = min(busy) if busy else min((self._served_s.get(c, 0.0) for c in clients),
                                           default=0.0)
        for c in back:  # no credit for time away
            self._served_s[c] = max(self._served_s.get(c, level), level)
            self._idle.discard(c)
        for c in clients:  # and no account more than DEBT_S ahead of the least served
            self._served_s[c] = min(self._served_s[c], level + DEBT_S)
        oldest = {c: min(j.seq for j in ready if j.client is c) for c in clients}
        client = min(clients, key=lambda c: (self._served_s[c], self._last_unit.get(c, 0.0),
                                             oldest[c]))
        return min((j for j in ready if j.client is client), key=lambda j: j.seq)

    def _charge(self, job: Job, seconds: float) -> None:
        with self._cv:
            if job.client in self._served_s:
                self._served_s[job.client] += seconds
                self._last_unit[job.client] = time.monotonic()

    def _should_yield(self, job: Job) -> bool:
        """Between layers: stop if cancelled, or if more urgent runnable work waits (background
        only: interactive work gives way between chunks, not inside one)."""
        if job.cancelled:
            return True
        now = time.monotonic()
        mine = self._urgency(job, now)  # once aged, it is not preempted inside a chunk
        if mine == INTERACTIVE:
            return False
        return any(self._urgency(j, now) < mine and not j.cancelled and _writable(j.client)
                   for j in list(self._jobs))

    def _chunk(self, priority: int, job: Job | None = None) -> int:
        """Prefill tokens per unit: background small; else what takes ~chunk_target_s here.
        A chunk costs a fixed part (one pass over the weights, what a one-row step costs) plus
        a part per token, which grows with the context (more keys to attend to): the job's
        own latest chunk says what a token costs now, else the engine's average. (Sizing by
        tokens per second alone shrank chunks in a loop: small chunks measure slow.)"""
        if priority >= WARM_PRIORITY:
            return self.background_chunk
        per_tok = self._chunk_s_per_tok if job is None else job.timings.get(
            "chunk_s_per_tok", self._chunk_s_per_tok)
        if per_tok <= 0:
            fit = 4 * MIN_CHUNK  # nothing measured yet
        else:
            room = max(self.chunk_target_s - self._fixed_s, self.chunk_target_s / 4)
            fit = int(room / per_tok) // CHUNK_ROUND * CHUNK_ROUND
        return max(1, min(self.interactive_chunk, max(MIN_CHUNK, fit)))

    def _start_kv(self, job: Job, keep: int, need: int) -> KVCache:
        """A working K/V for the job: the last job's buffer if it is large enough (truncated to
        what it shares with this prompt), else a new one; `job.match` (held) is what the prompt
        cache has of the prompt, for `_copy_cached`."""
        cfg = self.model.config
        keep = safe_prefix(job.spans, keep)  # never resume inside an image's block
        job.match = self.cache.lookup(job.ids)
        self.cache.hold(job.match)
        kv = self._hot
        if kv is not None and kv.capacity >= need:
            # the last job's buffer: already paged in, and often most of this prompt
            self._hot = None
            kv.truncate(min(kv.common_prefix(job.ids), keep))
        else:
            kv = KVCache(cfg, min(cfg.context_length, -(-need // KV_ROUND) * KV_ROUND))
        kv.truncate(safe_prefix(job.spans, kv.length))
        return kv

    def _copy_cached(self, job: Job, kv: KVCache, keep: int) -> Iterator[None]:
        """Copy what the prompt cache holds of the prompt (beyond what `kv` has, up to `keep`)
        into the working K/V, COPY_UNIT positions a unit: copying thousands of cached
        positions into a fresh buffer (page faults) would hold up another client's keystroke
        like an oversized chunk. Matched again for every piece: between units another job's
        insert may split the nodes. A prompt with images is copied at once (never inside one)."""
        m = job.match  # just looked up; after a yield, matched again
        while True:
            assert m is not None
            end = min(m.length, keep)
            before = kv.length
            if before >= end:
                return
            self.cache.copy_into(m, kv, end if job.spans else min(end, before + COPY_UNIT))
            if job.spans:
                kv.truncate(safe_prefix(job.spans, kv.length))
                return
            assert kv.length > before, (kv.length, end)
            if kv.length >= end:
                return
            yield
            m = self.cache.match(job.ids)

    def _run_score(self, job: Job, t_start: float) -> Iterator[None]:
        """Score every continuation (engine/scoring.py) after the prompt's cached prefix."""
        model = self.model
        n = len(job.ids)
        need = n + max(len(c) for c in job.continuations) + 1
        kv = job.kv = self._start_kv(job, n - 1, need)
        yield from self._copy_cached(job, kv, n - 1)
        reused = kv.length
        self._reused += reused
        compute_s = 0.0
        # the prompt in chunks like any prefill (cached as they finish), then the candidates;
        # the last piece of the prompt, up to a chunk, goes into the scoring pass itself
        chunk = self._chunk(job.priority)  # sized like any prefill: others wait one chunk
        while n - 1 - kv.length > chunk:
            part = job.ids[kv.length : min(kv.length + chunk, n - 1)]
            t0 = time.perf_counter()
            try:
                forward(model.config, model.weights, part, kv, logits="none",
                        should_stop=lambda: self._should_yield(job))
            except Cancelled:
                if job.cancelled:
                    raise
                yield
                continue
            compute_s += time.perf_counter() - t0
            self.cache.insert(kv)
            yield
        if job.cancelled:
            raise Cancelled()
        t0 = time.perf_counter()
        lps = score(model, kv, job.ids.tolist(), job.continuations)
        compute_s += time.perf_counter() - t0
        evaluated = n - reused + sum(len(c) for c in job.continuations)
        self._evaluated += evaluated
        self.cache.insert(kv)
        self._served += 1
        # the prompt's bytes that the first n tokens do not cover belong to no continuation
        tok = model.tokenizer
        covered = len(tok.token_bytes_of(job.ids.tolist()[1:]))
        skip = int(job.timings["prompt_bytes"]) - covered
        _send(job.client, P.ScoreReply(
            job.req_id,
            logprobs=[[float(x) for x in lp] for lp in lps],
            ends=[_char_ends(tok, c, skip, t) for c, t in zip(job.continuations, job.cont_text,
                                                              strict=True)],
            prompt_tokens=n, reused_tokens=reused, evaluated_tokens=evaluated,
            queue_ms=(t_start - job.arrival) * 1000, compute_ms=compute_s * 1000,
        ))

    def _run(self, job: Job) -> Iterator[None]:
        """The job's work, one unit per `next()`: prefill chunks, then decode steps."""
        model, cfg = self.model, self.model.config
        n = len(job.ids)
        t_start = time.monotonic()
        if job.kind == "score":
            yield from self._run_score(job, t_start)
            return
        max_new = 0 if job.opts is None else min(job.opts.max_tokens, cfg.context_length - n)
        keep = n if job.opts is None else n - 1  # a completion must run >= 1 token for logits
        kv = job.kv = self._start_kv(job, keep, n + max(max_new, 1))
        yield from self._copy_cached(job, kv, keep)
        reused = kv.length
        self._reused += reused

        # prefill what the caches lacked, chunk by chunk; each finished chunk is cached
        logits: np.ndarray | None = None
        prefill_s = 0.0
        evaluated = 0
        while kv.length < n:
            # jobs interleave: another one may have cached more of this prompt meanwhile
            if self.cache.match(job.ids).length > kv.length:
                self.cache.copy_into(self.cache.lookup(job.ids), kv, keep)
                kv.truncate(safe_prefix(job.spans, kv.length))  # never inside an image
                if kv.length >= n:
                    break
            end = min(n, kv.length + self._chunk(job.priority, job))
            part = job.ids[kv.length : chunk_end(job.spans, kv.length, end)]  # images whole
            last = kv.length + len(part) >= n
            t0 = time.perf_counter()
            try:
                logits = forward(cfg, model.weights, part, kv, logits="last" if last else "none",
                                 should_stop=lambda: self._should_yield(job), soft=job.spans)
            except Cancelled:
                if job.cancelled:
                    raise
                yield  # preempted by more urgent work: redo this chunk later
                continue
            dt = time.perf_counter() - t0
            prefill_s += dt
            if len(part) >= MIN_CHUNK:
                self._chunk_tok_s = _ema(self._chunk_tok_s, len(part) / dt)
                per_tok = max(dt - self._fixed_s, 0.2 * dt) / len(part)
                self._chunk_s_per_tok = _ema(self._chunk_s_per_tok, per_tok)
                job.timings["chunk_s_per_tok"] = per_tok  # its latest: the context grows
            self._evaluated += len(part)
            evaluated += len(part)
            self.cache.insert(kv)
            if not last:
                yield
        if evaluated >= 32 and prefill_s > 0:
            self._prefill_tok_s = _ema(self._prefill_tok_s, evaluated / prefill_s)

        if job.opts is None:  # warm: the prompt is cached, nothing to generate
            self._served += 1
            _send(job.client, P.Done(job.req_id, "warmed", prompt_tokens=n,
                                     reused_tokens=n - evaluated, evaluated_tokens=evaluated,
                                     prefill_ms=prefill_s * 1000,
                                     queue_ms=(t_start - job.arrival) * 1000))
            return

        # decode, one step per unit (a plain token, or verified drafts); the first token
        # comes out of the prefill's logits
        assert logits is not None
        stream = TokenStream(model, job.opts, max_new)
        spec = (Speculator(self._drafter(job.ids, kv), self.forward_cost,
                           accept=self._accept.get(job.task))
                if job.opts.speculate and self.speculate else None)
        first_token_ms = 0.0
        t_dec = time.perf_counter()
        step = stream.step(logits)
        steps = [] if step is None else [step, *stream.forced()]  # and what a grammar forces
        pending = [s.token_id for s in steps]  # emitted, not yet in the K/V
        if spec is not None:
            spec.append([s.token_id for s in steps])
        while steps:
            for step in steps:
                if not first_token_ms:
                    first_token_ms = (time.monotonic() - job.arrival) * 1000
                if not _send(job.client, P.Token(job.req_id, step.token_id, step.text,
                                                 step.logprob,
                                                 [[float(i), lp] for i, lp in step.top])):
                    job.cancel_code = P.E_CANCELLED  # the client is gone
                    raise Cancelled()
            if stream.done:
                break
            yield
            if job.cancelled:
                raise Cancelled()
            if job.deadline is not None and time.monotonic() > job.deadline:
                stream.reason = "deadline"
                break
            steps, pending = decode_step(model, kv, stream, pending, spec,
                                         should_stop=lambda: job.cancelled)
        decode_s = time.perf_counter() - t_dec
        if len(stream.ids) > 4:
            self._decode_tok_s = _ema(self._decode_tok_s, (len(stream.ids) - 1) / decode_s)
        one_row = self.forward_cost.snapshot().get("1")
        if one_row:
            self._fixed_s = one_row / 1000  # a one-row step: the weights' pass
        tail = stream.finish()
        self.spec_stats.add(job.task, spec, len(stream.ids))
        if spec is not None:
            self._accept[job.task] = spec.accept  # the next request of its kind starts there
        self.cache.insert(kv)  # the generated text is likely the next prompt's prefix
        self._served += 1
        _send(job.client, P.Done(
            job.req_id, stream.reason, "".join(stream.text), tail,
            prompt_tokens=n, reused_tokens=n - evaluated, evaluated_tokens=evaluated,
            queue_ms=(t_start - job.arrival) * 1000, prefill_ms=prefill_s * 1000,
            first_token_ms=first_token_ms, decode_ms=decode_s * 1000, n_tokens=len(stream.ids),
        ))

    def _drafter(self, prompt: np.ndarray, kv: KVCache) -> Drafter:
        """Where drafts come from: the assistant model if one is loaded, else prompt lookup."""
        if self.draft_model is not None:
            return self.draft_model.drafter(self.model, kv, prompt)
        return PromptLookup(prompt.tolist())


def _common_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def _char_ends(tok: Any, ids: list[int], skip_bytes: int, text: str) -> list[int]:
    """Where (characters into ``text``) each token of ``ids`` ends, given that the tokens
    start ``skip_bytes`` bytes before ``text`` begins (a token may straddle the boundary)."""
    raw = text.encode("utf-8")
    ends, pos = [], -skip_bytes
    for t in ids:
        pos += len(tok.token_bytes(t))
        ends.append(len(raw[: max(pos, 0)].decode("utf-8", errors="ignore")))
    return ends


def _send(client: Client, msg: P.Message) -> bool:
    try:
        client.send(msg)
        return True
    except OSError:
        return False


def _ema(old: float, new: float, alpha: float = 0.3) -> float:
    return new if old == 0 else (1 - alpha) * old + alpha * new


def _cancel_message(job: Job) -> str:
    return {
        P.E_SUPERSEDED: f"request {job.req_id} was superseded by a newer one for {job.doc}",
        P.E_SHUTTING_DOWN: "the engine is shutting down",
    }.get(job.cancel_code, f"request {job.req_id} was cancelled")
