"""``expertflow.Engine``: many requests over one offloaded model, batched continuously.

Requests join and leave between forward passes. Each request keeps its own KV cache; a pass gathers
the caches of the sequences it runs into one left-padded batch (as transformers' batched ``generate``
pads) and hands each sequence its new entries back. That makes regrouping free of any constraint:
any subset of the running sequences can decode together, which is what the token scheduler needs.
(Transformers' paged continuous batching would avoid the gather, but its scheduler interface is
internal and changed between the releases we run on, and it flattens all sequences into one row,
where the step predictor wants one row per sequence; see docs/serving.md.)

A step is one forward pass:

- new requests are prefilled first, up to ``max_batch_size`` at once (left-padded);
- otherwise the next batch of the current decode round runs. A round covers every running sequence
  once, in batches the scheduler forms (``expertflow``: similar predicted routing paths together;
  ``fifo``: arrival order). At most one prefill pass runs between rounds, so a running sequence
  waits at most ``max_wait_steps`` (``2 * ceil(max_running / max_batch_size) - 1``) passes for its
  next token.

Greedy decoding gives each request the tokens it gets alone (up to floating-point ties).

With the experts spread over GPUs (``from_pretrained(..., distributed=True)``), rank 0's engine leads:
it schedules, samples and serves, and before each forward pass tells the other ranks which requests
run with which new tokens (one broadcast). The others run :meth:`Engine.follow`, which mirrors the
requests' KV caches and runs the same passes, so every MoE layer's collective meets its peers.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
import torch

from .scheduler import SCHEDULES, activated_pairs, group_by_paths, group_fifo

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from .offload import OffloadEngine

__all__ = ["Engine", "Request", "SamplingParams", "EngineError"]

log = logging.getLogger(__name__)


class EngineError(ValueError):
    """A request the engine cannot take (bad input, too long, queue full, engine closed)."""


@dataclass(frozen=True)
class SamplingParams:
    """``temperature`` 0: greedy. ``top_k`` 0 and ``top_p`` 1: no filter. ``seed``: per request."""

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()

    def check(self) -> None:
        def whole(value: object) -> bool:
            return isinstance(value, (int, np.integer)) and not isinstance(value, bool)

        def number(value: object) -> bool:
            return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)

        if not whole(self.max_new_tokens) or self.max_new_tokens < 1:
            raise EngineError(f"max_new_tokens must be a whole number of at least 1, got {self.max_new_tokens!r}")
        if not number(self.temperature) or not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise EngineError(f"temperature must be finite and >= 0, got {self.temperature!r}")
        if not number(self.top_p) or not 0 < self.top_p <= 1:
            raise EngineError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not whole(self.top_k) or self.top_k < 0:
            raise EngineError(f"top_k must be a whole number >= 0, got {self.top_k!r}")
        if self.seed is not None and (not whole(self.seed) or not 0 <= self.seed < 2**63):
            raise EngineError(f"seed must be a whole number from 0 to 2**63 - 1, got {self.seed!r}")
        if not isinstance(self.stop_token_ids, (tuple, list)) or not all(whole(t) for t in self.stop_token_ids):
            raise EngineError(f"stop_token_ids must be a sequence of token ids, got {self.stop_token_ids!r}")


@dataclass
class Request:
    """One submitted prompt: ``output_ids`` grows as tokens come; ``finish_reason`` is ``length``,
    ``stop`` or ``error`` once done (``error`` then says why)."""

    id: int
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    # Engine state: the KV cache (per layer, keys and values [1, H, n, D]), the last token's routing
    # path [L, k], the sampler's generator.
    _cache: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list, repr=False)
    _path: np.ndarray | None = field(default=None, repr=False)
    _generator: torch.Generator | None = field(default=None, repr=False)
    _engine: object = field(default=None, repr=False)  # the engine it was submitted to

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def length(self) -> int:
        """Tokens in its KV cache: the prompt and every generated token but the last."""
        return len(self.prompt_ids) + max(len(self.output_ids) - 1, 0)


class Engine:
    """Continuous batching over a model from :func:`expertflow.from_pretrained`.

    ``max_batch_size``: sequences per forward pass. ``schedule``: ``expertflow`` (the token
    scheduler) or ``fifo``. ``max_running``: sequences decoding at once (default 4 batches);
    ``max_queue``: requests waiting beyond those. ``max_wait_steps`` (a property) bounds how many
    passes a running sequence waits for its next token. ``predictor``: a routing-path predictor (file
    or object) whose next-token forecasts the scheduler groups by (default: the expertflow policy's
    trained one, else each sequence's last path). ``path_forecast(requests) -> paths`` replaces it
    (``[R, L, k]`` ids or ``[R, L, E]`` probabilities): benchmarks emulate forecasts of known quality
    there. ``length_weight`` > 0 keeps similar lengths together.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        max_batch_size: int = 8,
        schedule: str = "expertflow",
        *,
        max_running: int | None = None,
        max_queue: int = 256,
        length_weight: float = 0.0,
        predictor=None,
        path_forecast=None,
        before_pass=None,
    ) -> None:
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise EngineError(f"max_batch_size must be a whole number of at least 1, got {max_batch_size!r}")
        if schedule not in SCHEDULES:
            raise EngineError(f"unknown schedule '{schedule}'; choose {' or '.join(SCHEDULES)}")
        model = cast("PreTrainedModel", model)  # nn.Module's stubs type every attribute as a tensor or module
        engine = getattr(model, "expertflow", None)
        if engine is None:
            raise EngineError("the model has no ExpertFlow engine: load it with expertflow.from_pretrained")
        if model.config.is_encoder_decoder:
            raise EngineError("the serving engine runs decoder-only models; this one is encoder-decoder")
        self.model: PreTrainedModel = model
        self.offload: OffloadEngine = engine
        self.max_batch_size = max_batch_size
        self.schedule = schedule
        self.max_running = max_running if max_running is not None else 4 * max_batch_size
        if self.max_running < max_batch_size:
            raise EngineError(f"max_running ({self.max_running}) must be at least max_batch_size ({max_batch_size})")
        if not isinstance(max_queue, int) or max_queue < 1:
            raise EngineError(f"max_queue must be a whole number of at least 1, got {max_queue!r}")
        if not (length_weight >= 0 and np.isfinite(length_weight)):
            raise EngineError(f"length_weight must be finite and >= 0, got {length_weight!r}")
        self.max_queue = max_queue
        self.length_weight = length_weight
        if predictor is not None and path_forecast is not None:
            raise EngineError("pass a predictor or a path_forecast, not both")
        if predictor is not None and not isinstance(predictor, (str, Path)) and not (hasattr(predictor, "config") and callable(predictor)):
            raise EngineError(f"predictor must be a routing-path predictor (a file or a RoutingPathPredictor), got {predictor!r}")
        if path_forecast is not None and not callable(path_forecast):
            raise EngineError(f"path_forecast must be a function of the running requests, got {path_forecast!r}")
        if isinstance(predictor, (str, Path)):
            from .predictor import RoutingPathPredictor

            predictor = RoutingPathPredictor.load(predictor)
        if predictor is None and path_forecast is None:  # the expertflow policy's trained step predictor, where it has one
            candidate = getattr(engine.policy, "predictor", None)
            predictor = candidate if hasattr(candidate, "config") else None
        if predictor is not None and (predictor.config.num_layers, predictor.config.num_experts) != (engine.num_layers, engine.num_experts):
            raise EngineError(f"the predictor forecasts {predictor.config.num_layers} layers x {predictor.config.num_experts} "
                              f"experts; this model has {engine.num_layers} x {engine.num_experts}")
        self.predictor = predictor
        self.path_forecast = path_forecast
        # Benchmarks hook in here: ``before_pass(batch, new_ids, past)`` sees each pass before it runs.
        self.before_pass = before_pass
        self.device = next(model.parameters()).device
        self.num_layers = engine.num_layers
        self.num_experts = engine.num_experts
        self.top_k = engine.architecture.dims(model.config)[1]
        self.max_positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        self.eos_token_ids = _eos_ids(model)
        self.vocab_size = int(cast(torch.Tensor, model.get_input_embeddings().weight).shape[0])
        self._cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._round: deque[list[Request]] = deque()
        self._prefilled = False  # a prefill pass ran since the last round was planned
        self._last_paths: np.ndarray | None = None  # [n, L, k]: the last decode batch's routing
        self._ids = itertools.count()
        self._lock = threading.Lock()  # submit() may come from other threads than step()
        self._closed = False
        # Distributed: rank 0 leads (tells the others each pass); the others follow (follow()).
        self.shard = engine.shard
        self._freed: list[int] = []  # leader: finished requests the followers still mirror
        self.stats = {"steps": 0, "prefill_passes": 0, "decode_batches": 0, "activated_pairs": 0, "tokens": 0,
                      "rounds": 0, "schedule_ms": 0.0}

    # -- requests ---------------------------------------------------------------------------------
    def submit(self, prompt: Sequence[int] | str, params: SamplingParams | None = None, tokenizer=None,
               **sampling) -> Request:
        """Queues a prompt (token ids, or text with ``tokenizer``); sampling fields as keywords or
        ``params``. Raises :class:`EngineError` for bad input, an over-long request or a full queue."""
        if self._closed:
            raise EngineError("the engine is closed; create a new one")
        self._check_leader()
        try:
            params = params if params is not None else SamplingParams(**sampling)
        except TypeError as e:
            raise EngineError(f"unknown sampling field: {e}") from None
        params.check()
        if isinstance(prompt, str):
            if tokenizer is None:
                raise EngineError("a text prompt needs tokenizer=; or pass token ids")
            prompt = tokenizer(prompt)["input_ids"]
        if isinstance(prompt, (np.ndarray, torch.Tensor)):
            if prompt.ndim != 1 or (prompt.dtype.is_floating_point if isinstance(prompt, torch.Tensor) else prompt.dtype.kind != "i"):
                raise EngineError(f"a prompt tensor must be 1-D token ids of an integer dtype, got {tuple(prompt.shape)} {prompt.dtype}")
            prompt = prompt.tolist()
        if not isinstance(prompt, (list, tuple)) or not all(
                isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt):
            raise EngineError("a prompt is text (with tokenizer=) or a list of integer token ids")
        ids = [int(t) for t in prompt]
        if not ids:
            raise EngineError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise EngineError(f"prompt token ids {bad[:5]} are outside the vocabulary of {self.vocab_size}")
        if self.max_positions is not None and len(ids) + params.max_new_tokens > self.max_positions:
            raise EngineError(f"the prompt's {len(ids)} tokens plus max_new_tokens={params.max_new_tokens} exceed the "
                              f"model's {self.max_positions} positions; shorten the prompt or ask for fewer tokens")
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise EngineError(f"the queue is full ({self.max_queue} requests waiting); retry later")
            request = Request(next(self._ids), ids, params, _engine=self)
            if params.seed is not None:
                request._generator = torch.Generator(device=self.device).manual_seed(params.seed)
            self._waiting.append(request)
        return request

    def _own(self, request: Request) -> None:
        if request._engine is not self:
            raise EngineError(f"request {request.id} was submitted to another engine")

    def cancel(self, request: Request) -> None:
        """Stops a request (a client that went away) and frees its cache."""
        self._own(request)
        with self._lock:
            if request in self._waiting:
                self._waiting.remove(request)
        self._finish(request, "cancelled")

    @property
    def max_wait_steps(self) -> int:
        """Passes a running sequence waits at most between two of its tokens. A round runs at most
        ``n = ceil(max_running / max_batch_size)`` batches and rounds regroup, so a sequence in the
        first batch of one round and the last of the next waits ``n - 1`` passes, one prefill pass
        between the rounds, then ``n - 1`` more: ``2n - 1``."""
        return 2 * -(-self.max_running // self.max_batch_size) - 1

    def has_work(self) -> bool:
        return bool(self._waiting or self._running)

    # -- stepping ---------------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """One forward pass; returns the requests that got a token (or finished) in it."""
        if self._closed:
            raise EngineError("the engine is closed; create a new one")
        self._check_leader()
        if not self._round:
            joining: list[Request] = []
            if not self._prefilled:  # one prefill pass between rounds: it delays the running by one pass
                with self._lock:
                    room = min(self.max_batch_size, self.max_running - len(self._running))
                    joining = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
            if joining:
                self._prefilled = True
                self._pass(joining, new_sequences=True)
                self.stats["steps"] += 1
                return joining
            self._prefilled = False
            self._plan_round()
        if not self._round:
            return []
        batch = [r for r in self._round.popleft() if not r.done]
        if batch:
            self._pass(batch, new_sequences=False)
            self.stats["steps"] += 1
        return batch

    def run(self) -> None:
        """Steps until every submitted request is done."""
        while self.has_work():
            self.step()

    def stream(self, request: Request) -> Iterator[int]:
        """The request's new tokens as they come, stepping the engine (single-threaded use)."""
        self._own(request)
        sent = 0
        while True:
            while sent < len(request.output_ids):
                yield request.output_ids[sent]
                sent += 1
            if request.done:
                if request.error:
                    raise EngineError(request.error)
                return
            self.step()

    def generate(self, prompts: Sequence[Sequence[int]], **sampling) -> list[list[int]]:
        """Submits every prompt, runs to completion, returns the generated ids in order."""
        requests = [self.submit(p, **sampling) for p in prompts]
        self.run()
        for r in requests:
            if r.error:
                raise EngineError(r.error)
        return [r.output_ids for r in requests]

    def close(self) -> None:
        """Fails what is still queued or running; later calls raise. The model stays usable. A leading
        engine (distributed rank 0) releases the followers."""
        if self._closed:
            return
        for r in list(self._waiting) + self._running:
            self._finish(r, "error", "the engine was closed")
        self._closed = True
        self._waiting.clear()
        self._round.clear()
        if self.shard is not None and self.shard.rank == 0:
            try:
                self.shard.broadcast_object({"op": "stop"})
            except Exception as e:  # the followers are gone already (the whole job is stopping)
                log.debug("could not tell the followers to stop: %s", e)

    def follow(self) -> None:
        """Distributed ranks other than 0: runs the passes rank 0's engine announces, until it closes.
        Each request's KV cache is mirrored here; sampling and scheduling happen on rank 0 alone. A
        pass that fails raises, as it does on rank 0: a distributed engine does not retry."""
        if self.shard is None or self.shard.rank == 0:
            raise EngineError("follow() runs on distributed ranks other than 0; rank 0 submits and steps")
        mirrored: dict[int, Request] = {}
        while True:
            message = cast(dict, self.shard.broadcast_object(None))
            if message["op"] == "stop":
                self._closed = True
                return
            for rid in message["free"]:
                mirrored.pop(rid, None)
            new_sequences = message["new_sequences"]
            batch = []
            for rid, prompt, num_out, ids in zip(message["ids"], message["prompts"], message["num_out"], message["new_ids"]):
                if new_sequences:
                    mirrored[rid] = Request(rid, prompt, SamplingParams(), _engine=self)
                request = mirrored[rid]
                # Only its count (the length) and last token matter here; a pass adds at most one.
                out = request.output_ids
                if len(out) < num_out:
                    out.extend([ids[-1]] * (num_out - len(out)))
                elif out:
                    out[-1] = ids[-1]
                batch.append(request)
            self._forward(batch, message["new_ids"], new_sequences)  # a failure ends this rank: see _pass

    def _check_leader(self) -> None:
        if self.shard is not None and self.shard.rank != 0:
            raise EngineError(f"rank {self.shard.rank} follows rank 0's engine: call follow() here, submit on rank 0")

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------------
    def _plan_round(self) -> None:
        running = [r for r in self._running if not r.done]
        if not running:
            return
        start = time.perf_counter()
        groups = group_fifo(len(running), self.max_batch_size)
        if self.schedule == "expertflow" and len(running) > self.max_batch_size:
            try:
                paths = self._predicted_paths(running)
                lengths = np.array([r.length for r in running])
                groups = group_by_paths(paths, self.num_experts, self.max_batch_size, lengths, self.length_weight,
                                        after=self._last_paths)
            except Exception:  # a failing forecast costs the grouping, not the requests
                log.exception("the scheduler's forecast failed; this round runs in arrival order")
        self.stats["schedule_ms"] += (time.perf_counter() - start) * 1e3
        self.stats["rounds"] += 1
        self._round = deque([running[i] for i in g] for g in groups)

    def _predicted_paths(self, running: list[Request]) -> np.ndarray:
        """Each sequence's next-token routing as the scheduler sees it: the predictor's ``[R, L, E]``
        probabilities (one forward, one transfer), else the last token's path ``[R, L, k]``."""
        if self.path_forecast is not None:
            return np.asarray(self.path_forecast(running))
        previous = np.stack([r._path for r in running])  # type: ignore[misc]
        if self.predictor is None:
            return previous
        from .predictor import path_multi_hot

        predictor = self.predictor.to(self.device)
        last = torch.tensor([r.output_ids[-1] for r in running], device=self.device)
        positions = torch.tensor([r.length for r in running], device=self.device)
        with torch.no_grad():
            # The table lookup, not the module: calling it would fire the offload engine's step hook.
            table = cast(torch.Tensor, self.model.get_input_embeddings().weight)
            embeddings = torch.nn.functional.embedding(last, table).float()
            path = path_multi_hot(torch.from_numpy(previous).to(self.device), self.num_experts)
            probs = torch.sigmoid(predictor(embeddings, positions, path))
        return probs.float().cpu().numpy()

    def _forward(self, batch: list[Request], new_ids: list[list[int]], new_sequences: bool) -> torch.Tensor:
        """Runs ``new_ids`` (per sequence) on top of each sequence's cache; returns the last logits
        ``[B, V]`` and stores each sequence's new cache entries and routing path."""
        from transformers import DynamicCache

        if self.shard is not None and self.shard.rank == 0:
            # The followers run this pass too: told first, they build their caches while the leader does.
            with self._lock:
                freed, self._freed = self._freed, []
            self.shard.broadcast_object({"op": "forward", "free": freed, "ids": [r.id for r in batch], "new_sequences": new_sequences,
                                         "prompts": [r.prompt_ids if new_sequences else None for r in batch],
                                         "num_out": [len(r.output_ids) for r in batch], "new_ids": new_ids})
        past = [r.length if not new_sequences else 0 for r in batch]
        width = max(len(n) for n in new_ids)
        total = [p + len(n) for p, n in zip(past, new_ids)]
        past_width = max(past)
        pad = self.model.config.pad_token_id if self.model.config.pad_token_id is not None else 0
        ids = torch.tensor([[pad] * (width - len(n)) + n for n in new_ids], device=self.device)
        # Left padding: sequence i's past sits at the end of the past window, its new tokens at the
        # end of the new window.
        mask = torch.zeros(len(batch), past_width + width, dtype=torch.long, device=self.device)
        for i, (p, n) in enumerate(zip(past, new_ids)):
            mask[i, past_width - p : past_width] = 1
            mask[i, past_width + width - len(n) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past_width:]
        cache = DynamicCache()
        if past_width:
            for layer in range(len(batch[0]._cache)):
                keys = torch.cat([_left_pad(r._cache[layer][0], past_width) for r in batch])
                values = torch.cat([_left_pad(r._cache[layer][1], past_width) for r in batch])
                cache.update(keys, values, layer)
        if self.before_pass is not None:
            self.before_pass(batch, new_ids, past)
        self.offload.next_step(positions[:, -1], new_sequences, self._previous_paths(batch, new_sequences))
        with torch.no_grad():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             **{self._cache_kwarg: cache})
        layers = [(cast(torch.Tensor, getattr(layer, "keys")), cast(torch.Tensor, getattr(layer, "values")))  # noqa: B009
                  for layer in cache.layers]
        for i, r in enumerate(batch):
            fresh = len(new_ids[i])  # its new entries: the last ones of the padded window
            new = [(keys[i : i + 1, :, -fresh:], values[i : i + 1, :, -fresh:]) for keys, values in layers]
            r._cache = [(torch.cat([k0, k], dim=2), torch.cat([v0, v], dim=2)) for (k0, v0), (k, v) in zip(r._cache, new)] \
                if r._cache else [(k.clone(), v.clone()) for k, v in new]
            assert r._cache[0][0].shape[2] == total[i]
        self._record_paths(batch, width)
        return out.logits[:, -1].float()

    def _previous_paths(self, batch: list[Request], new_sequences: bool) -> np.ndarray | None:
        if new_sequences or any(r._path is None for r in batch):
            return None
        return np.stack([r._path for r in batch])  # type: ignore[misc]

    def _record_paths(self, batch: list[Request], width: int) -> None:
        """Each sequence's last token's experts per layer, from the routing run_layer copied to the host."""
        routing = [r for r in self.offload.routing if r is not None]
        if len(routing) < self.num_layers:
            return
        routed = np.stack([r.reshape(len(batch), width, -1)[:, -1] for r in routing])  # [L, B, k]
        routed = np.where(routed >= self.num_experts, -1, routed).astype(np.int64)
        for i, r in enumerate(batch):
            r._path = routed[:, i]

    def _pass(self, batch: list[Request], new_sequences: bool) -> None:
        """One prefill or decode pass. A pass that fails is retried a request at a time, so only the
        request that fails ends (with an error saying why)."""
        new_ids = [r.prompt_ids if new_sequences else [r.output_ids[-1]] for r in batch]
        try:
            logits = self._forward(batch, new_ids, new_sequences)
        except Exception as e:
            if self.shard is not None:
                # The ranks can no longer agree on each request's cache: end the engine (torchrun then
                # stops every rank) rather than let their collectives fall out of step.
                log.error("a forward pass failed on a distributed engine; stopping: %s", e)
                raise
            if len(batch) > 1:
                for r in batch:
                    self._pass([r], new_sequences)
                return
            stage = "prefill" if new_sequences else "decode"
            log.warning("request %d failed in %s: %s", batch[0].id, stage, e)
            self._finish(batch[0], "error", f"{stage} failed: {e}")
            return
        if new_sequences:
            self.stats["prefill_passes"] += 1
            self._running.extend(batch)
        else:
            self.stats["decode_batches"] += 1
            self._last_paths = np.stack([r._path for r in batch])  # type: ignore[misc]
            self.stats["activated_pairs"] += activated_pairs(self._last_paths, self.num_experts)
        self._emit(batch, logits)

    def _emit(self, batch: list[Request], logits: torch.Tensor) -> None:
        for i, r in enumerate(batch):
            try:
                token = self._sample(r, logits[i])
            except Exception as e:  # a request whose sampling fails ends alone
                log.warning("request %d failed in sampling: %s", r.id, e)
                self._finish(r, "error", f"sampling failed: {e}")
                continue
            r.output_ids.append(token)
            self.stats["tokens"] += 1
            if token in self.eos_token_ids or token in r.params.stop_token_ids:
                self._finish(r, "stop")
            elif len(r.output_ids) >= r.params.max_new_tokens:
                self._finish(r, "length")

    def _sample(self, request: Request, logits: torch.Tensor) -> int:
        p = request.params
        if p.temperature == 0:
            return int(logits.argmax())
        logits = (logits - logits.max()) / p.temperature  # shifted first: a tiny temperature gives 0 and -inf, never NaN
        if p.top_k:
            kth = torch.topk(logits, min(p.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if p.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(0) - sorted_probs < p.top_p  # the smallest set reaching top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=request._generator))

    def _finish(self, request: Request, reason: str, error: str | None = None) -> None:
        if request.done:
            return
        request.finish_reason, request.error = reason, error
        request._cache = []
        if request in self._running:
            self._running.remove(request)
        if self.shard is not None and self.shard.rank == 0:
            with self._lock:  # told with the next pass: a collective belongs to the thread that steps
                self._freed.append(request.id)


def _left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """``[1, H, n, D]`` -> ``[1, H, width, D]`` with zeros before (masked out by the attention mask)."""
    n = t.shape[2]
    if n == width:
        return t
    return torch.cat([t.new_zeros(*t.shape[:2], width - n, *t.shape[3:]), t], dim=2)


def _eos_ids(model: PreTrainedModel) -> frozenset[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = model.config.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)
