"""Seeded, reproducible workloads: what each request of a run says.

Text is drawn from `WORDS`, a list of common English words each of which is exactly one cl100k
token with or without a leading space, so "N words joined by spaces" is N prompt tokens and
token counts can be chosen on the command line. The same `WorkloadSpec` (same seed) always yields
the same requests, which is what makes arms of a ``--compare`` run comparable.

Four workloads:

* ``shared-prefix``: ``groups`` system prompts of ``prefix_tokens``, each shared by
  ``prompts_per_group`` questions of ``question_tokens``; the requests are shuffled, so a group's
  prompts arrive spread over the run (as in the peers' "b2b-saas" benchmark).
* ``multi-turn``: ``users`` conversations of ``rounds`` turns behind one shared system prompt;
  each turn resends the whole history including the real answers the endpoint returned, so a
  user's next round can only start once its previous one has finished. ``history_tokens`` of
  user-specific context open each conversation (production-stack's multi-round-qa
  ``--user-history-prompt``: the earlier chat or documents only that user's turns share).
* ``random``: every prompt is fresh text of ``prefix_tokens + question_tokens``; no reuse beyond
  what a chat template shares.
* ``trace``: the requests of a trace file in the common (Mooncake) format, sent at the trace's
  timestamps (`loadtest.traces`); prompts are made from its hash ids so that its prefix sharing is
  reproduced exactly.
"""

from __future__ import annotations

import asyncio
import random
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

WorkloadName = Literal["shared-prefix", "multi-turn", "random", "trace"]
PathKind = Literal["chat", "completions"]

WORKLOADS: tuple[str, ...] = ("shared-prefix", "multi-turn", "random", "trace")

_WORD_LIST = """
    the of and to in is that for it as was with be by on not he this are or his from at which but have an they
    you were her she there had all one their we can has will more if no when would so what who been some into its
    them than only time do may other most about these any over out also new after first two like our could years
    used then made many between world well people such work where each both through much back part state year how
    because called since being very high during under same great however long own while before life later way city
    three around found day even small american area
"""
WORDS: tuple[str, ...] = tuple(_WORD_LIST.split())
"""122 words, each exactly one cl100k token alone and after a space (checked with a cl100k encoder)."""

TURN_SEPARATOR = "\n\nUser: "
ANSWER_CUE = "\nAssistant:"
"""Completions-API rendering of a conversation (chat requests carry roles instead)."""


def word_text(rng: random.Random, n: int) -> str:
    """``n`` random words from `WORDS` joined by spaces: ``n`` cl100k tokens."""
    return " ".join(rng.choices(WORDS, k=n))


@dataclass(frozen=True)
class WorkloadSpec:
    """Everything that decides the requests of a run (not how fast they are sent)."""

    name: WorkloadName = "shared-prefix"
    path: PathKind = "chat"
    seed: int = 0
    groups: int = 30
    prompts_per_group: int = 5
    prefix_tokens: int = 1500
    question_tokens: int = 300
    output_tokens: int = 100
    users: int = 10
    rounds: int = 5
    history_tokens: int = 0
    """multi-turn: user-specific context before the first question (0: none)."""
    requests: int | None = None
    """Requests to plan; None = the workload's natural size (random: 100)."""
    trace: str | None = None
    """trace: the JSONL file."""
    block_tokens: int = 512
    """trace: tokens per hash id (512 in the Mooncake traces)."""
    time_scale: float = 1.0
    """trace: multiplies the timestamps (0.5: twice as fast)."""
    token_scale: float = 1.0
    """trace: multiplies prompt, output and block lengths."""
    tokenizer: str = "cl100k"
    """trace: the pods' tokenizer kind, which a hash id's block is exactly ``block_tokens`` tokens of."""

    def natural_size(self) -> int:
        """The number of distinct requests the workload defines."""
        if self.name == "shared-prefix":
            return self.groups * self.prompts_per_group
        if self.name == "multi-turn":
            return self.users * self.rounds
        if self.name == "trace":
            from extproc_router.loadtest.traces import load_trace

            if self.trace is None:
                raise ValueError("the trace workload needs a trace file")
            return len(load_trace(self.trace))
        return 100

    def planned_requests(self) -> int:
        """Requests a run of this spec sends at most (multi-turn: users x rounds; trace: its lines)."""
        n = self.requests if self.requests is not None else self.natural_size()
        if self.name in ("multi-turn", "trace"):
            n = min(n, self.natural_size())
        return n


@dataclass(slots=True)
class PlannedRequest:
    """One request of the plan. ``body`` lacks model and stream settings; the client adds them."""

    index: int
    """Position in the plan; the same request has the same index in every arm."""
    label: str
    """Where it comes from, e.g. ``g3/q1`` (group 3, question 1), ``u2/r4``, ``r17``."""
    body: dict[str, Any]
    user: int | None = None
    at_s: float = 0.0
    """When to send it, in seconds from the start of the arm (workloads with ``scheduled`` set)."""


class Workload(ABC):
    """A source of requests. Stateful (multi-turn feeds answers back), so build one per arm."""

    scheduled = False
    """True: requests carry their own send times (``PlannedRequest.at_s``), not the run's arrival process."""

    def __init__(self, spec: WorkloadSpec) -> None:
        self.spec = spec
        self.size = spec.planned_requests()

    @abstractmethod
    async def next(self) -> PlannedRequest | None:
        """The next request to send, waiting until one is ready; None when there will be no more."""

    def finished(self, request: PlannedRequest, answer: str | None) -> None:  # noqa: B027 - optional hook
        """Report the outcome of ``request``: the assistant's text, or None when it failed."""

    def _body(self, messages: list[dict[str, str]], prompt: str) -> dict[str, Any]:
        if self.spec.path == "chat":
            return {"messages": messages, "max_tokens": self.spec.output_tokens}
        return {"prompt": prompt, "max_tokens": self.spec.output_tokens}


class StaticWorkload(Workload):
    """A workload whose requests do not depend on answers: a fixed list, handed out in order."""

    def __init__(self, spec: WorkloadSpec, requests: list[PlannedRequest]) -> None:
        super().__init__(spec)
        self.requests = requests
        self._pos = 0

    async def next(self) -> PlannedRequest | None:
        if self._pos >= len(self.requests):
            return None
        req = self.requests[self._pos]
        self._pos += 1
        return req


def shared_prefix(spec: WorkloadSpec) -> StaticWorkload:
    """Groups of questions behind shared system prompts, shuffled; repeated passes if more are asked for."""
    rng = random.Random(f"shared-prefix:{spec.seed}")
    prefixes = [word_text(rng, spec.prefix_tokens) for _ in range(spec.groups)]
    prompts = [
        (g, q, word_text(rng, spec.question_tokens)) for g in range(spec.groups) for q in range(spec.prompts_per_group)
    ]
    planned: list[PlannedRequest] = []
    total = spec.planned_requests()
    workload = StaticWorkload(spec, planned)
    while prompts and len(planned) < total:
        # Each pass is its own shuffle of every prompt, so a longer run still visits all groups evenly.
        order = list(range(len(prompts)))
        rng.shuffle(order)
        for i in order[: total - len(planned)]:
            g, q, question = prompts[i]
            messages = [{"role": "system", "content": prefixes[g]}, {"role": "user", "content": question}]
            body = workload._body(messages, prefixes[g] + "\n\n" + question)
            planned.append(PlannedRequest(index=len(planned), label=f"g{g}/q{q}", body=body))
    return workload


def random_prompts(spec: WorkloadSpec) -> StaticWorkload:
    """Prompts of fresh random text: the no-reuse control."""
    rng = random.Random(f"random:{spec.seed}")
    planned: list[PlannedRequest] = []
    workload = StaticWorkload(spec, planned)
    for i in range(spec.planned_requests()):
        text = word_text(rng, spec.prefix_tokens + spec.question_tokens)
        body = workload._body([{"role": "user", "content": text}], text)
        planned.append(PlannedRequest(index=i, label=f"r{i}", body=body))
    return workload


class MultiTurnWorkload(Workload):
    """Conversations that grow by each question and its real answer, behind one shared system prompt.

    A user is *ready* when its previous turn has finished; `next` hands out ready users in the
    order they became ready and waits when none is. A failed turn leaves no trace in the history
    (its question is dropped), and the user goes on with its next round.
    """

    def __init__(self, spec: WorkloadSpec) -> None:
        super().__init__(spec)
        rng = random.Random(f"multi-turn:{spec.seed}")
        self.system = word_text(rng, spec.prefix_tokens)
        self.questions = [[word_text(rng, spec.question_tokens) for _ in range(spec.rounds)] for _ in range(spec.users)]
        if spec.history_tokens:
            # Its own generator, so the same seed without history gives the same requests as before.
            ctx = random.Random(f"multi-turn-history:{spec.seed}")
            for qs in self.questions:
                qs[0] = word_text(ctx, spec.history_tokens) + "\n\n" + qs[0]
        self.history: list[list[tuple[str, str]]] = [[] for _ in range(spec.users)]
        self.round = [0] * spec.users
        users = list(range(spec.users))
        rng.shuffle(users)
        self._ready: deque[int] = deque(users)
        self._in_flight = 0
        self._issued = 0
        self._changed = asyncio.Event()

    async def next(self) -> PlannedRequest | None:
        # No lock needed: between the checks and the pop below there is no await.
        while True:
            if self._issued >= self.size:
                return None
            if self._ready:
                break
            if not self._in_flight:
                return None  # every user has finished all rounds
            self._changed.clear()
            await self._changed.wait()
        user = self._ready.popleft()
        self._in_flight += 1
        index = self._issued
        self._issued += 1
        return PlannedRequest(index=index, label=f"u{user}/r{self.round[user]}", body=self.body_for(user), user=user)

    def body_for(self, user: int) -> dict[str, Any]:
        """The request of ``user``'s current round: system prompt, history, next question."""
        question = self.questions[user][self.round[user]]
        messages = [{"role": "system", "content": self.system}]
        prompt = self.system
        for asked, answer in self.history[user]:
            messages += [{"role": "user", "content": asked}, {"role": "assistant", "content": answer}]
            prompt += TURN_SEPARATOR + asked + ANSWER_CUE + answer
        messages.append({"role": "user", "content": question})
        prompt += TURN_SEPARATOR + question + ANSWER_CUE
        return self._body(messages, prompt)

    def finished(self, request: PlannedRequest, answer: str | None) -> None:
        user = request.user
        if user is None:
            return
        if answer is not None:
            self.history[user].append((self.questions[user][self.round[user]], answer))
        self.round[user] += 1
        self._in_flight -= 1
        if self.round[user] < self.spec.rounds:
            self._ready.append(user)
        self._changed.set()  # every waiter re-checks; one of them takes the user


def build_workload(spec: WorkloadSpec) -> Workload:
    """A fresh workload for one arm; the same spec always yields the same requests."""
    if spec.name == "shared-prefix":
        return shared_prefix(spec)
    if spec.name == "multi-turn":
        return MultiTurnWorkload(spec)
    if spec.name == "random":
        return random_prompts(spec)
    if spec.name == "trace":
        from extproc_router.loadtest.traces import TraceWorkload

        return TraceWorkload(spec)
    raise ValueError(f"unknown workload {spec.name!r}; choose one of {', '.join(WORKLOADS)}")
