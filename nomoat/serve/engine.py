"""Continuous batching: one thread runs the model over every live sequence, one token per step.

Sequences join the running batch at step boundaries (their prompts prefilled together, right-padded) and leave
the moment they finish or are cancelled, so a short answer never waits for a long one. Each row of one shared
KV cache is a slot with its own position (`KVCache.pos` of shape (B,)). Tokens become text, cut at stop strings,
through the tokenizer's DecodeStream and StopStream, and EOS ends a sequence; HTTP, JSON and the OpenAI formats are
not here (app.py, protocol.py).
"""

from __future__ import annotations

import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from nomoat.generate import GREEDY_BELOW, decode_step, sample_next
from nomoat.model import KVCache, Transformer
from nomoat.serve.metrics import Metrics
from nomoat.tokenizer import DecodeStream, StopStream, Tokenizer

# A nucleus this small holds only the most likely token (and one below float32's range would hold none).
MIN_TOP_P = 1e-6


class QueueFull(Exception):
    """More sequences are waiting than the engine's queue holds (the server answers 429)."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW or self.top_p < MIN_TOP_P


@dataclass
class Event:
    """New text for one sequence; finish_reason ("stop", "length", "error") is set on its last event."""

    text: str
    finish_reason: str | None = None


@dataclass(eq=False)
class Generation:
    """One sequence being generated: a prompt, its settings, and where its output goes."""

    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    generator: torch.Generator
    submitted: float = field(default_factory=time.perf_counter)
    slot: int = -1
    pos: int = 0  # tokens in the cache
    last: int = 0  # the newest token, sampled but not yet in the cache
    generated: int = 0
    cancelled: bool = False
    decoder: DecodeStream | None = None
    stops: StopStream = field(init=False)  # holds back decoded text that may be the start of a stop string

    def __post_init__(self) -> None:
        self.stops = StopStream(self.params.stop)


class Engine:
    """Serve many sequences with one model: `submit` from any thread, events arrive through each `emit`."""

    def __init__(
        self,
        model: Transformer,
        tokenizer: Tokenizer,
        max_batch: int = 16,
        max_queue: int = 64,
        max_context: int = 4096,
        prefill_tokens: int = 2048,
        metrics: Metrics | None = None,
        compile: bool = True,
    ) -> None:
        """max_context caps the tokens per sequence below the model's own context when that is long: the cache
        holds max_batch x max_context positions per layer (Llama 3's 131,072 would need tens of GB)."""
        self.model = model.eval()
        self.step = decode_step(self.model) if compile else self.model  # generate.py's compiled decode step
        self.tokenizer = tokenizer
        self.max_batch, self.max_queue, self.prefill_tokens = max_batch, max_queue, prefill_tokens
        self.max_len = min(model.cfg.max_seq_len, max_context)
        self.metrics = metrics or Metrics()
        self.device = model.device
        self.cache = KVCache(model.cfg, max_batch, self.max_len, device=model.device, dtype=model.dtype)
        self.cache.pos = torch.zeros(max_batch, dtype=torch.long, device=model.device)
        self.slots: list[Generation | None] = [None] * max_batch
        self.waiting: deque[Generation] = deque()
        self.wake = threading.Condition()
        self.running = False
        self.thread: threading.Thread | None = None

    @torch.no_grad()
    def warm_up(self) -> float:
        """Compile the decode step for one live row and for several, before any request waits on it; seconds."""
        start = time.perf_counter()
        for rows in (1, 2):
            self.step(torch.zeros((rows, 1), dtype=torch.long, device=self.device), self.cache.narrow(rows, 2))
        self.cache.pos.zero_()
        return time.perf_counter() - start

    # --- called from other threads ---

    def start(self) -> None:
        """Run the loop in a thread of its own, unless it runs already (`serve` runs it on the main thread)."""
        with self.wake:
            if self.running:
                return
            self.running = True
        self.thread = threading.Thread(target=self._loop, name="nomoat-engine", daemon=True)
        self.thread.start()

    def run(self) -> None:
        """Run the loop in the calling thread until stop(). The main thread is the place for it: oneDNN's and
        OpenMP's kernels measured up to 2x slower when called from any other thread (a 135M model's 16-row step
        165 vs 85 tokens/s), so `serve` computes here and answers HTTP from a thread."""
        with self.wake:
            self.running = True
        self._loop()

    def stop(self) -> None:
        with self.wake:
            self.running = False
            self.wake.notify()
        if self.thread is not None:
            self.thread.join()

    def submit(
        self, prompt: list[int], params: SamplingParams, emits: Sequence[Callable[[Event], None]]
    ) -> list[Generation]:
        """Queue one sequence per emit (the n choices of a request), all or none; QueueFull when there is no room.

        Choice i of a seeded request samples with seed + i, so that each choice is repeatable on its own."""
        seqs = []
        for i, emit in enumerate(emits):
            generator = torch.Generator(device=self.device)
            if params.seed is None:
                generator.seed()
            else:
                generator.manual_seed((params.seed + i) % 2**64)
            seqs.append(Generation(list(prompt), params, emit, generator))
        with self.wake:
            if len(self.waiting) + len(seqs) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} sequences are already waiting; try again shortly")
            self.waiting.extend(seqs)
            self.wake.notify()
        return seqs

    def cancel(self, seqs: Sequence[Generation]) -> None:
        """Stop these sequences; their slots free at the next step boundary, and they emit nothing more."""
        with self.wake:
            for seq in seqs:
                seq.cancelled = True
            self.wake.notify()

    @property
    def queue_depth(self) -> int:
        return len(self.waiting)

    @property
    def active(self) -> int:
        return sum(s is not None for s in self.slots)

    # --- the engine thread ---

    def _loop(self) -> None:
        while True:
            with self.wake:
                while self.running and not self.waiting and self.active == 0:
                    self.wake.wait()
                if not self.running:
                    return
                self._drop_cancelled()
                admitted = self._admit()
            try:
                with torch.inference_mode():
                    if admitted:
                        self._prefill(admitted)
                    if self.active:
                        self._decode()
            except Exception:  # a bug: fail the live sequences, keep serving the next ones
                traceback.print_exc()
                for seq in admitted + [s for s in self.slots if s is not None]:
                    self._finish(seq, "error")
            self.metrics.set_load(self.queue_depth, self.active)

    def _drop_cancelled(self) -> None:
        self.waiting = deque(s for s in self.waiting if not s.cancelled)
        for seq in self.slots:
            if seq is not None and seq.cancelled:
                self.slots[seq.slot] = None

    def _admit(self) -> list[Generation]:
        """Waiting sequences that fit in free slots and in this step's prefill budget (at least one)."""
        admitted: list[Generation] = []
        longest = 0
        free = [i for i, s in enumerate(self.slots) if s is None]
        while self.waiting and free:
            longest_then = max(longest, len(self.waiting[0].prompt))
            if admitted and longest_then * (len(admitted) + 1) > self.prefill_tokens:
                break
            seq = self.waiting.popleft()
            seq.slot = free.pop(0)
            self.slots[seq.slot] = seq
            admitted.append(seq)
            longest = longest_then
        return admitted

    def _prefill(self, seqs: list[Generation]) -> None:
        """Run the prompts as one right-padded batch in a scratch cache, then copy each into its slot.

        Right padding is safe: a real token attends only to earlier positions, so the padding after it changes
        nothing, and only each prompt's own positions are copied. What an earlier occupant left in a slot beyond
        them lies in the new sequence's future, masked until its own tokens overwrite it."""
        lengths = [len(s.prompt) for s in seqs]
        T = max(lengths)
        ids = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, seq in enumerate(seqs):
            ids[i, : lengths[i]] = torch.tensor(seq.prompt)
        scratch = KVCache(self.model.cfg, len(seqs), T, device=self.device, dtype=self.cache.k[0].dtype)
        last = torch.tensor(lengths, device=self.device) - 1
        logits = self.model(ids.to(self.device), cache=scratch, logits_at=last)[:, 0]  # (B, V)
        for layer in range(len(self.cache.k)):
            for i, seq in enumerate(seqs):
                self.cache.k[layer][seq.slot, :, : lengths[i]] = scratch.k[layer][i, :, : lengths[i]]
                self.cache.v[layer][seq.slot, :, : lengths[i]] = scratch.v[layer][i, :, : lengths[i]]
        for i, seq in enumerate(seqs):
            seq.pos = lengths[i]
            seq.decoder = DecodeStream(self.tokenizer)
        self._sample(seqs, logits)

    def _decode(self) -> None:
        """One token for every live slot: a batch over the first rows up to the last live one."""
        live = [s for s in self.slots if s is not None]
        rows = max(s.slot for s in live) + 1
        length = max(s.pos for s in live) + 1
        tokens = torch.zeros((rows, 1), dtype=torch.long)
        positions = torch.zeros(rows, dtype=torch.long)  # free rows in between compute at position 0, unread
        for seq in live:
            tokens[seq.slot, 0] = seq.last
            positions[seq.slot] = seq.pos
        self.cache.pos[:rows] = positions
        logits = self.step(tokens.to(self.device), self.cache.narrow(rows, length))[:, -1]  # (rows, V)
        for seq in live:
            seq.pos += 1
        self._sample(live, logits[[s.slot for s in live]])

    def _sample(self, seqs: list[Generation], logits: torch.Tensor) -> None:
        """Pick each sequence's next token from its logits row (len(seqs), V), then emit the new text."""
        generated = sum(seq.generated for seq in seqs)
        try:
            self._pick(seqs, logits)
        finally:
            self.metrics.count_tokens(sum(seq.generated for seq in seqs) - generated)

    def _pick(self, seqs: list[Generation], logits: torch.Tensor) -> None:
        greedy = logits.argmax(-1).tolist()
        now = time.perf_counter()
        for i, seq in enumerate(seqs):
            p = seq.params
            token = greedy[i] if p.greedy else sample_next(logits[i], p.temperature, None, p.top_p, seq.generator)
            if seq.generated == 0:
                self.metrics.observe_ttft(now - seq.submitted)
            if token == self.tokenizer.eos_id:
                self._finish(seq, "stop")
                continue
            seq.generated += 1
            seq.last = token
            assert seq.decoder is not None
            if self._emit_text(seq, seq.decoder.push(token)):
                continue
            if seq.generated >= p.max_tokens or seq.pos + 1 >= self.max_len:  # prompt + output fill the context
                self._finish(seq, "length")

    def _emit_text(self, seq: Generation, piece: str) -> bool:
        """Emit what of piece is safe to show; True when a stop string was reached (the sequence is then finished,
        its last event the text before the stop)."""
        text = seq.stops.push(piece)
        if seq.stops.stopped:
            seq.emit(Event(text, "stop"))
            self._release(seq)
            return True
        if text:
            seq.emit(Event(text))
        return False

    def _finish(self, seq: Generation, reason: str) -> None:
        """Flush held-back text (it may still complete a stop string) and send the last event."""
        if seq.cancelled or self.slots[seq.slot] is not seq:
            return
        if reason != "error" and seq.decoder is not None and self._emit_text(seq, seq.decoder.flush()):
            return
        seq.emit(Event(seq.stops.flush(), reason))
        self._release(seq)

    def _release(self, seq: Generation) -> None:
        self.slots[seq.slot] = None
