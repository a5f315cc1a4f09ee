"""Learning a unit exactly once on a KATO node: ``NodeSession`` and, after a trainer's crash, ``unit_took_effect``.

A unit is a list of events that must become ONE pattern, counted once. ``NodeSession.learn_unit`` sends it
through ``KatoClient`` in one of two protocols: ``keys`` (one keyed request, where the server honours
``Idempotency-Key``) or ``verify`` (a real KATO: observe-sequence, then learn, each lost answer decided from
the session's state). ``on_phase`` hooks run before each mutating request, so a trainer can journal what
``unit_took_effect`` needs. Why each decision is right, and the limits: docs/client.md ("Exactly once").
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from .errors import (
    AmbiguousEffect,
    ConfigError,
    KeyAlreadyUsed,
    MaybeApplied,
    ProtocolError,
    ServerUnavailable,
    SessionLost,
    SessionNotFound,
)
from .patterns import pattern_name, sort_event, strip_prefix

if TYPE_CHECKING:
    from .client import KatoClient

log = logging.getLogger(__name__)

__all__ = ["Mode", "NodeSession", "PhaseHook", "unit_took_effect"]


Mode = Literal["keys", "verify"]
PhaseHook = Callable[[str, str], None]


class NodeSession:
    """One node's training session that learns each unit exactly once (docs/client.md argues each decision).

    Args:
        client: the KatoClient to use.
        node_id: the node whose knowledge base receives the units.
        config: the session config. ``max_pattern_length`` must be 0 (or absent), because units are cut
            by the caller.
        mode: ``"keys"`` (Idempotency-Key) or ``"verify"`` (decide from server state); None picks
            ``"keys"`` when the server supports idempotency (asked at the first unit: the constructor sends nothing).
        max_session_losses: how many times one unit may lose its session before SessionLost is raised.
        ttl_seconds: the session's time to live (None: the server's default, 3600 s on KATO).
    """

    def __init__(self, client: KatoClient, node_id: str, config: Mapping[str, Any], *,
                 mode: Mode | None = None, max_session_losses: int = 5, ttl_seconds: int | None = None) -> None:
        if config.get("max_pattern_length", 0) != 0:
            raise ConfigError(
                f"node {node_id!r}: NodeSession needs max_pattern_length=0 (got {config['max_pattern_length']!r}); "
                "with server-side auto-learn a lost observe answer cannot be repaired. Cut units in the trainer"
            )
        if mode not in (None, "keys", "verify"):
            raise ConfigError(f"mode must be 'keys', 'verify' or None, not {mode!r}")
        self.client = client
        self.node_id = node_id
        self.config = dict(config)
        self._mode_asked = mode
        self._mode: Mode | None = None
        self.max_session_losses = max_session_losses
        self.ttl_seconds = ttl_seconds
        self._session_id: str | None = None
        self._stm_clean = False  # known empty: fresh session, after a learn, or after clear-stm

    def __repr__(self) -> str:
        return f"NodeSession({self.node_id!r}, mode={self._mode or self._mode_asked!r}, session={self._session_id!r})"

    @property
    def mode(self) -> Mode:
        """The protocol; on first use, None (auto) asks the server (``GET /``, cached by the client)."""
        if self._mode is None:
            idempotent = self.client.supports_idempotency
            if self._mode_asked == "keys" and not idempotent:
                raise ConfigError(f"server {self.client.base_url} does not support idempotency keys; use mode='verify'")
            self._mode = self._mode_asked or ("keys" if idempotent else "verify")
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

    def learn_unit(self, events: Sequence[Sequence[str]], key: str, on_phase: PhaseHook | None = None) -> str:
        """Learn exactly these events as ONE pattern, exactly once; return its ``PTRN|...`` name.

        Args:
            events: the unit's events, at least 2 symbols in total.
            key: deterministic and unique per unit of the run; the Idempotency-Key in keys mode.
            on_phase: called as ``on_phase(phase, session_id)`` BEFORE each mutating request.
                The phase is "keyed" in keys mode and "observe" or "learn" in verify mode.

        Raises:
            ServerUnavailable: the retry budget of a call ran out. Whether the unit took effect is then
                unknown. In keys mode, resending the unit with the same key is safe. In verify mode, use
                the journaled phase and :func:`unit_took_effect`.
            SessionLost: the session vanished more than ``max_session_losses`` times during the unit.
            AmbiguousEffect: a learn's answer was lost and its session vanished, and the pattern exists
                in the knowledge base.
            ProtocolError: the server learned something other than these events.
        """
        sorted_events = [sort_event(e) for e in events]
        expected = pattern_name(sorted_events)
        if not expected:
            raise ValueError(f"node {self.node_id!r}, unit {key!r}: a unit needs at least 2 symbols, got {sorted_events!r}")
        hook = on_phase or (lambda phase, sid: None)
        losses = 0
        while True:
            try:
                if self.mode == "keys":
                    name = self._learn_keyed(sorted_events, key, hook)
                else:
                    name = self._learn_verified(sorted_events, expected, hook)
                break
            except SessionNotFound as exc:
                losses += 1
                log.warning("node %s, unit %s: session %s lost (%d); redoing the unit in a new session",
                            self.node_id, key, exc.session_id, losses)
                self._session_id, self._stm_clean = None, False
                if losses > self.max_session_losses:
                    raise SessionLost(
                        f"node {self.node_id!r}, unit {key!r}: the session vanished {losses} times in one unit "
                        f"on {self.client.base_url}; the server may expire sessions too fast (check its TTL)"
                    ) from exc
            except BaseException:
                self._stm_clean = False  # the STM's content is unknown until cleared
                raise
        if strip_prefix(name) != strip_prefix(expected):
            self._stm_clean = False
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
            self._stm_clean = True
        return sid

    def _learn_keyed(self, events: list[list[str]], key: str, hook: PhaseHook) -> str:
        sid = self._ensure_clean()
        hook("keyed", sid)
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
        for _ in range(self.client.settings.retry_max_attempts):
            hook("observe", sid)
            self._stm_clean = False
            try:
                self.client.observe_sequence(sid, events)
            except MaybeApplied as exc:
                log.info("node %s: observe-sequence answer lost (%s); clearing the STM and resending",
                         self.node_id, exc)
                self.client.clear_stm(sid)
                self._stm_clean, repaired = True, True
                continue
            # After a repair, check before learning: a late copy of the lost request would show here
            if not repaired or self.client.stm(sid) == events:
                return
            log.warning("node %s: STM after a repaired observe-sequence is not the unit; clearing again", self.node_id)
            self.client.clear_stm(sid)
            self._stm_clean = True
        raise ServerUnavailable(
            f"node {self.node_id!r}: observe-sequence on {self.client.base_url} kept losing its answer "
            f"({self.client.settings.retry_max_attempts} tries); the connection to the server is unreliable"
        )

    def _learn_once(self, sid: str, events: list[list[str]], expected: str, hook: PhaseHook) -> str:
        """Send learn until it is known to have been applied exactly once."""
        for _ in range(self.client.settings.retry_max_attempts):
            hook("learn", sid)
            try:
                name = self.client.learn(sid).pattern_name
            except MaybeApplied as exc:
                log.info("node %s: learn answer lost (%s); reading the STM to decide", self.node_id, exc)
                if _learn_applied(self.client, self.node_id, sid, events, expected):
                    self._stm_clean = True
                    return expected
                continue  # STM still holds the unit: the learn did not happen; send it again
            self._stm_clean = True
            return name
        raise ServerUnavailable(
            f"node {self.node_id!r}: learn on {self.client.base_url} kept losing its answer "
            f"({self.client.settings.retry_max_attempts} tries); the connection to the server is unreliable"
        )


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
        if client.pattern(node_id, expected) is None:
            raise  # not applied, and the session is gone: learn_unit redoes the unit
        raise AmbiguousEffect(
            f"node {node_id!r}: a learn of {expected} on session {session_id} went unanswered and the session "
            f"then vanished on {client.base_url}; the pattern exists, but it may come from an earlier unit with "
            "the same content, so whether this learn was applied cannot be decided from server state. "
            "Count the unit as possibly learned (its frequency may be one too high or correct)"
        ) from exc
    if stm == []:
        return True  # learn always clears the STM, and nothing else touched this session
    if stm == events:
        return False
    raise ProtocolError(
        f"node {node_id!r}: after an unanswered learn, session {session_id} on {client.base_url} holds "
        f"{stm!r}, neither empty nor the unit {events!r}; another client may be using the session"
    )


def unit_took_effect(client: KatoClient, node_id: str, session_id: str, events: Sequence[Sequence[str]],
                     phase: str) -> bool:
    """After the trainer's own crash (verify mode): did the unit's learn take effect?

    Args:
        phase: the last phase journaled for the unit through ``on_phase``. With "observe" no learn was
            sent, so the answer is False. With "learn" the session's STM decides: empty means True, the
            unit's events mean False. If the session is gone, ``GET /pattern`` decides: an absent pattern
            means False, and a present one raises AmbiguousEffect.

    Keys mode needs no such check: resend the unit with the same key.
    """
    if phase == "observe":
        return False
    if phase != "learn":
        raise ValueError(
            f"phase must be 'observe' or 'learn' (verify mode), not {phase!r}; in keys mode resend the unit "
            "with the same key: the server answers the stored response"
        )
    sorted_events = [sort_event(e) for e in events]
    try:
        return _learn_applied(client, node_id, session_id, sorted_events, pattern_name(sorted_events))
    except SessionNotFound:
        return False  # raised only when the pattern is absent
