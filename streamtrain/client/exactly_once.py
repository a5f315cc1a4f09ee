"""Learning a unit exactly once on a KATO node: ``NodeSession`` and, after a trainer's crash, ``unit_took_effect``.

A unit is a list of events that must become ONE pattern, counted once. ``NodeSession.learn_unit`` sends it
through ``KatoClient`` in one of three protocols: ``keys`` (one keyed request, where the server honours
``Idempotency-Key``), ``counter`` (a real KATO: one observe-sequence with learn_at_end, a lost answer decided
from the session's observation counter and STM) or ``verify`` (a real KATO: observe-sequence, then learn, each
lost answer decided from the STM). ``on_phase`` hooks run before each mutating request, so a trainer can
journal what ``unit_took_effect`` needs. Why each decision is right, and the limits: docs/client.md ("Exactly once").
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal, NoReturn

from ..errors import (
    AmbiguousEffect,
    ConfigError,
    KeyAlreadyUsed,
    MaybeApplied,
    ProtocolError,
    SessionLost,
    SessionNotFound,
)
from ..patterns import pattern_name, sort_event, strip_prefix

if TYPE_CHECKING:
    from .kato import KatoClient

log = logging.getLogger(__name__)

__all__ = ["Mode", "NodeSession", "PhaseHook", "unit_took_effect"]


Mode = Literal["keys", "counter", "verify"]
# on_phase(phase, session_id, counter): counter is the session's observation counter before the request
# ("counted" phase only; None otherwise)
PhaseHook = Callable[[str, str, "int | None"], None]


class NodeSession:
    """One node's training session that learns each unit exactly once (docs/client.md argues each decision).

    Args:
        client: the KatoClient to use.
        node_id: the node whose knowledge base receives the units.
        config: the session config. ``max_pattern_length`` must be 0 (or absent), because units are cut
            by the caller.
        mode: ``"keys"`` (Idempotency-Key), ``"counter"`` (one request; decide a lost answer from the session's
            observation counter) or ``"verify"`` (two requests; decide from the STM). None picks ``"keys"`` when
            the server supports idempotency, else ``"counter"`` (asked at the first unit: the constructor sends
            nothing).
        max_session_losses: how many times one unit may lose its session before SessionLost is raised.
        ttl_seconds: the session's time to live (None: the server's default, 3600 s on KATO).
        on_session_lost: called after a lost session (SessionNotFound), before the unit is redone in a new one: a
            server restarted on another database loses them, so the trainer checks its knowledge base there.
    """

    def __init__(self, client: KatoClient, node_id: str, config: Mapping[str, Any], *,
                 mode: Mode | None = None, max_session_losses: int = 5, ttl_seconds: int | None = None,
                 on_session_lost: Callable[[], None] | None = None) -> None:
        if config.get("max_pattern_length", 0) != 0:
            raise ConfigError(
                f"node {node_id!r}: NodeSession needs max_pattern_length=0 (got {config['max_pattern_length']!r}); "
                "with server-side auto-learn a lost observe answer cannot be repaired. Cut units in the trainer"
            )
        if mode not in (None, "keys", "counter", "verify"):
            raise ConfigError(f"mode must be 'keys', 'counter', 'verify' or None, not {mode!r}")
        self.client = client
        self.node_id = node_id
        self.config = dict(config)
        self._mode_asked = mode
        self._mode: Mode | None = None
        self.max_session_losses = max_session_losses
        self.ttl_seconds = ttl_seconds
        self.on_session_lost = on_session_lost
        self._session_id: str | None = None
        self._stm_clean = False  # known empty: fresh session, after a learn, or after clear-stm
        self._counter: int | None = None  # counter mode: the session's observation counter, known with a clean STM

    def __repr__(self) -> str:
        return f"NodeSession({self.node_id!r}, mode={self._mode or self._mode_asked!r}, session={self._session_id!r})"

    @property
    def mode(self) -> Mode:
        """The protocol; on first use, None (auto) asks the server (``GET /``, cached by the client)."""
        if self._mode is None:
            idempotent = self.client.supports_idempotency
            if self._mode_asked == "keys" and not idempotent:
                raise ConfigError(f"server {self.client.base_url} does not support idempotency keys; use mode='verify'")
            self._mode = self._mode_asked or ("keys" if idempotent else "counter")
        return self._mode

    @property
    def session_id(self) -> str:
        """The session's id (created on first use)."""
        return self._session_id or self.open()

    def open(self) -> str:
        """Create the session now (checking its config) and return its id."""
        info = self.client.create_session(self.node_id, self.config, ttl_seconds=self.ttl_seconds)
        self._session_id, self._stm_clean = info.session_id, True
        log.debug("node %s: session %s created", self.node_id, info.session_id)
        return info.session_id

    def close(self) -> None:
        """Delete the session, best effort."""
        if self._session_id is not None:
            self.client.delete_session_quietly(self._session_id)
            self._session_id = None

    def __enter__(self) -> NodeSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def learn_unit(self, events: Sequence[Sequence[str]], key: str, on_phase: PhaseHook | None = None, *,
                   name: str | None = None) -> str:
        """Learn exactly these events as ONE pattern, exactly once; return its ``PTRN|...`` name.

        Args:
            events: the unit's events, at least 2 symbols in total.
            key: deterministic and unique per unit of the run; the Idempotency-Key in keys mode (in the other
                modes only messages name it).
            on_phase: called as ``on_phase(phase, session_id, counter)`` BEFORE each mutating request. The
                phase is "keyed" in keys mode; "counted" in counter mode, with the session's observation
                counter before the request (then "learn" if KATO's final learn failed); "observe" or "learn" in
                verify mode. ``counter`` is None but for "counted".
            name: the events' name when the caller has it (``hierarchy.plan_sample``'s steps: sorted and named
                already), which saves sorting and hashing them again.

        Raises:
            ServerUnavailable: the server kept failing for ``client.outage_seconds`` (or a call reached
                ``client.retry_max_attempts``). Whether the unit took effect is then unknown. In keys mode,
                resending the unit with the same key is safe. In counter and verify mode, use the journaled
                phase (and counter) and :func:`unit_took_effect`.
            SessionLost: the session vanished more than ``max_session_losses`` times during the unit.
            AmbiguousEffect: a learn's answer was lost and its session vanished, and the pattern exists
                in the knowledge base.
            ProtocolError: the server learned something other than these events.
        """
        if name is not None and isinstance(events, list):
            sorted_events, expected = events, name
        else:
            sorted_events = [sort_event(e) for e in events]
            expected = pattern_name(sorted_events)
        if not expected:
            raise ValueError(f"node {self.node_id!r}, unit {key!r}: a unit needs at least 2 symbols, got {sorted_events!r}")
        hook = on_phase or (lambda phase, sid, counter: None)
        losses = 0
        while True:
            try:
                if self.mode == "keys":
                    name = self._learn_keyed(sorted_events, key, hook)
                elif self.mode == "counter":
                    name = self._learn_counted(sorted_events, expected, hook)
                else:
                    name = self._learn_verified(sorted_events, expected, hook)
                break
            except SessionNotFound as exc:
                losses += 1
                log.warning("node %s, unit %s: session %s lost (%d); redoing the unit in a new session",
                            self.node_id, key, exc.session_id, losses)
                self._session_id, self._stm_clean, self._counter = None, False, None
                if losses > self.max_session_losses:
                    raise SessionLost(
                        f"node {self.node_id!r}, unit {key!r}: the session vanished {losses} times in one unit "
                        f"on {self.client.base_url}; the server may expire sessions too fast (check its TTL)"
                    ) from exc
                if self.on_session_lost is not None:
                    self.on_session_lost()
            except BaseException:
                self._stm_clean, self._counter = False, None  # the STM's content is unknown until cleared
                raise
        if strip_prefix(name) != strip_prefix(expected):
            self._stm_clean, self._counter = False, None
            raise ProtocolError(
                f"node {self.node_id!r}, unit {key!r}: server {self.client.base_url} learned {name!r}, expected "
                f"{expected!r} from {sorted_events!r}; the session's STM held something else "
                "(another client on this session?)"
            )
        return expected

    def _ensure_clean(self) -> str:
        sid = self.session_id
        if not self._stm_clean:
            self.client.clear_stm(sid)
            self._stm_clean, self._counter = True, None  # clear-stm also resets KATO's counter: read it again
        return sid

    def _learn_counted(self, events: list[list[str]], expected: str, hook: PhaseHook) -> str:
        """One ``observe-sequence(events, learn_at_end=True)``; a lost answer is decided by the counter and the STM."""
        sid = self._ensure_clean()
        if self._counter is None:  # a new session, or after a clear: read the counter once (the STM must be empty)
            self._counter, stm = self.client.cognition(sid)
            if stm:
                raise ProtocolError(f"node {self.node_id!r}: session {sid} on {self.client.base_url} holds {stm!r} "
                                    "right after it was created or cleared; another client may be using it")
        t, n = self._counter, len(events)
        since: float | None = None  # the first lost answer, on the outage tracker's clock
        for resends in itertools.count():
            hook("counted", sid, t)
            self._stm_clean, self._counter = False, None
            try:
                result = self.client.observe_sequence(sid, events, learn_at_end=True)
            except MaybeApplied as exc:
                since = self.client.outage.now() if since is None else since
                log.info("node %s: observe-sequence answer lost (%s); reading the session's counter to decide",
                         self.node_id, exc)
                outcome = _sequence_outcome(self.client, self.node_id, sid, events, expected, t)
                if outcome == "not applied":
                    self._stm_clean, self._counter = True, t
                    self.client.pause_before_resend(resends, exc.last_cause, since)  # or ServerUnavailable
                    continue  # counter unchanged: nothing of it was saved; send it again
                name = expected if outcome == "learned" else self._learn_once(sid, events, expected, hook)
                self._counter = t + n
                return name
            times = [r.time for r in result.results]
            if result.initial_stm_length != 0 or result.observations_processed != n or (times and times[-1] != t + n):
                raise ProtocolError(
                    f"node {self.node_id!r}: observe-sequence on session {sid} ({self.client.base_url}) answered "
                    f"initial STM {result.initial_stm_length}, {result.observations_processed} observations, "
                    f"counter {times[-1] if times else '?'}; expected 0, {n}, {t + n}: another client on the session?"
                )
            if result.final_learned_pattern and result.final_stm_length == 0:
                self._stm_clean, self._counter = True, t + n
                return result.final_learned_pattern
            if result.final_stm_length == n:  # KATO logs and swallows a failed final learn: learn it now
                log.warning("node %s: the final learn of an observe-sequence failed on the server; sending learn",
                            self.node_id)
                name = self._learn_once(sid, events, expected, hook)
                self._counter = t + n
                return name
            raise ProtocolError(
                f"node {self.node_id!r}: observe-sequence with learn_at_end on session {sid} ({self.client.base_url}) "
                f"learned {result.final_learned_pattern!r} and left {result.final_stm_length} events in the STM"
            )
        raise AssertionError("unreachable")  # pragma: no cover

    def _learn_keyed(self, events: list[list[str]], key: str, hook: PhaseHook) -> str:
        sid = self._ensure_clean()
        hook("keyed", sid, None)
        self._stm_clean = False
        try:
            result = self.client.observe_sequence(sid, events, learn_at_end=True, idempotency_key=key)
        except KeyAlreadyUsed as exc:
            # Keys are unique per unit and only applied requests store theirs, so this unit was already
            # learned, in another session (e.g. before the trainer's crash). The pattern must exist.
            self._stm_clean = True  # this request was not applied
            expected = pattern_name(events)
            if self.client.pattern(self.node_id, expected) is None:
                raise ProtocolError(
                    f"node {self.node_id!r}: key {key!r} is recorded as applied, but pattern {expected} is not in "
                    f"the knowledge base on {self.client.base_url}; was the key reused for another unit?"
                ) from exc
            log.info("node %s: unit %s was already applied in another session (key conflict)", self.node_id, key)
            return expected
        self._stm_clean = True  # a learn always clears the STM
        return result.final_learned_pattern or ""

    def _learn_verified(self, events: list[list[str]], expected: str, hook: PhaseHook) -> str:
        sid = self._ensure_clean()
        self._observe_verified(sid, events, hook)
        return self._learn_once(sid, events, expected, hook)

    def _observe_verified(self, sid: str, events: list[list[str]], hook: PhaseHook) -> None:
        """Put exactly ``events`` into the (empty) STM; repair a lost answer by clear + resend."""
        repaired = False
        since: float | None = None  # the first lost answer, on the outage tracker's clock
        for resends in itertools.count():
            hook("observe", sid, None)
            self._stm_clean = False
            try:
                self.client.observe_sequence(sid, events)
            except MaybeApplied as exc:
                since = self.client.outage.now() if since is None else since
                log.info("node %s: observe-sequence answer lost (%s); clearing the STM and resending",
                         self.node_id, exc)
                self.client.clear_stm(sid)
                self._stm_clean, repaired = True, True
                self.client.pause_before_resend(resends, exc.last_cause, since)
                continue
            # After a repair, check before learning: a late copy of the lost request would show here
            if not repaired or self.client.stm(sid) == events:
                return
            log.warning("node %s: STM after a repaired observe-sequence is not the unit; clearing again", self.node_id)
            self.client.clear_stm(sid)
            self._stm_clean = True
            since = self.client.outage.now() if since is None else since
            self.client.pause_before_resend(resends, "the STM after a repaired observe-sequence was not the unit",
                                            since)
        raise AssertionError("unreachable")  # pragma: no cover

    def _learn_once(self, sid: str, events: list[list[str]], expected: str, hook: PhaseHook) -> str:
        """Send learn until it is known to have been applied exactly once."""
        since: float | None = None  # the first lost answer, on the outage tracker's clock
        for resends in itertools.count():
            hook("learn", sid, None)
            try:
                name = self.client.learn(sid).pattern_name
            except MaybeApplied as exc:
                since = self.client.outage.now() if since is None else since
                log.info("node %s: learn answer lost (%s); reading the STM to decide", self.node_id, exc)
                if _learn_applied(self.client, self.node_id, sid, events, expected):
                    self._stm_clean = True
                    return expected
                self.client.pause_before_resend(resends, exc.last_cause, since)
                continue  # STM still holds the unit: the learn did not happen; send it again
            self._stm_clean = True
            return name
        raise AssertionError("unreachable")  # pragma: no cover


def _learn_applied(client: KatoClient, node_id: str, session_id: str, events: list[list[str]], expected: str) -> bool:
    """After an unanswered learn: True if it was applied, False if not; raise when undecidable.

    A vanished session means a redo is needed: the unit is redone only when the pattern is absent
    (then the learn was surely not applied). The redo is signalled by SessionNotFound, which learn_unit
    handles.
    """
    try:
        if not session_id:  # no session was recorded (e.g. a journal without one): same as a vanished one
            raise SessionNotFound(f"no session id recorded for the learn of {expected}", session_id)
        stm = client.stm(session_id)
    except SessionNotFound as exc:
        _absent_or_ambiguous(client, node_id, session_id, expected, exc)
    if stm == []:
        return True  # learn always clears the STM, and nothing else touched this session
    if stm == events:
        return False
    raise ProtocolError(
        f"node {node_id!r}: after an unanswered learn, session {session_id} on {client.base_url} holds "
        f"{stm!r}, neither empty nor the unit {events!r}; another client may be using the session"
    )


def _sequence_outcome(client: KatoClient, node_id: str, session_id: str, events: list[list[str]], expected: str,
                      counter: int) -> str:
    """After an unanswered ``observe-sequence(events, learn_at_end=True)`` sent at ``counter`` on a clean STM.

    Returns "not applied" (counter unchanged, STM empty), "learned" (counter + len(events), STM empty) or
    "observed" (counter + len(events), STM = events: KATO's final learn failed). A vanished session raises
    SessionNotFound when the pattern is absent (redo the unit) and AmbiguousEffect when it is present.
    """
    try:
        if not session_id:  # no session was recorded: same as a vanished one
            raise SessionNotFound(f"no session id recorded for the observe-sequence of {expected}", session_id)
        time, stm = client.cognition(session_id)
    except SessionNotFound as exc:
        _absent_or_ambiguous(client, node_id, session_id, expected, exc)
    n = len(events)
    if time == counter and stm == []:
        return "not applied"
    if time == counter + n and stm == []:
        return "learned"
    if time == counter + n and stm == events:
        return "observed"
    raise ProtocolError(
        f"node {node_id!r}: after an unanswered observe-sequence of {n} events sent at counter {counter}, session "
        f"{session_id} on {client.base_url} has counter {time} and STM {stm!r}; another client may be using it"
    )


def _absent_or_ambiguous(client: KatoClient, node_id: str, session_id: str, expected: str,
                         exc: SessionNotFound) -> NoReturn:
    """The session of an unanswered learn vanished: re-raise (redo the unit) if the pattern is absent, else raise."""
    if client.pattern(node_id, expected) is None:
        raise exc  # not applied, and the session is gone: learn_unit redoes the unit
    raise AmbiguousEffect(
        f"node {node_id!r}: a learn of {expected} on session {session_id} went unanswered and the session "
        f"then vanished on {client.base_url}; the pattern exists, but it may come from an earlier unit with "
        "the same content, so whether this learn was applied cannot be decided from server state. "
        "Count the unit as possibly learned (its frequency may be one too high or correct)"
    ) from exc


def unit_took_effect(client: KatoClient, node_id: str, session_id: str, events: Sequence[Sequence[str]],
                     phase: str, counter: int | None = None) -> bool:
    """After the trainer's own crash (counter or verify mode): did the unit's learn take effect?

    Args:
        phase: the last phase journaled for the unit through ``on_phase``. "observe": no learn was sent (False).
            "learn": the session's STM decides (empty: True; the unit's events: False). "counted": the
            session's counter and STM decide against ``counter``, the journaled counter before the request
            (unchanged: False; advanced by the unit's length with an empty STM: True; advanced with the unit in
            the STM: False, its final learn failed and the unit is redone in a new session). If the session is
            gone, ``GET /pattern`` decides: an absent pattern means False, and a present one raises
            AmbiguousEffect.

    Keys mode needs no such check: resend the unit with the same key.
    """
    if phase == "observe":
        return False
    if phase not in ("learn", "counted") or (phase == "counted" and counter is None):
        raise ValueError(
            f"phase must be 'observe', 'learn' or 'counted' with its counter, not {phase!r} (counter {counter!r}); "
            "in keys mode resend the unit with the same key: the server answers the stored response"
        )
    sorted_events = [sort_event(e) for e in events]
    expected = pattern_name(sorted_events)
    try:
        if phase == "learn":
            return _learn_applied(client, node_id, session_id, sorted_events, expected)
        assert counter is not None
        return _sequence_outcome(client, node_id, session_id, sorted_events, expected, counter) == "learned"
    except SessionNotFound:
        return False  # raised only when the pattern is absent
