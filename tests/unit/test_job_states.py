"""The job state machine: allowed transitions, final states, failure from anywhere."""

from __future__ import annotations

from itertools import pairwise

import pytest

from schemas.jobs import FINAL_STATES, TRANSITIONS, JobState, can_transition, sources_of

S = JobState
NON_FINAL = [s for s in JobState if s not in FINAL_STATES]

HAPPY_PATH = [
    S.REQUESTED,
    S.RENDERING,
    S.RENDERED,
    S.MODERATING,
    S.APPROVED,
    S.PUBLISHING,
    S.PUBLISHED,
    S.TAKEN_DOWN,
]


def test_every_state_has_an_entry() -> None:
    assert set(TRANSITIONS) == set(JobState)


@pytest.mark.parametrize(("src", "dst"), list(pairwise(HAPPY_PATH)))
def test_happy_path_is_legal(src: JobState, dst: JobState) -> None:
    assert can_transition(src, dst)


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (S.MODERATING, S.NEEDS_REVIEW),
        (S.MODERATING, S.REJECTED),
        (S.NEEDS_REVIEW, S.APPROVED),
        (S.NEEDS_REVIEW, S.REJECTED),
        (S.PUBLISHING, S.REJECTED),  # the publisher's consent re-check can still refuse
    ],
)
def test_review_and_rejection_branches(src: JobState, dst: JobState) -> None:
    assert can_transition(src, dst)


@pytest.mark.parametrize(
    ("src", "dst"),
    [
        (S.PUBLISHED, S.RENDERING),
        (S.PUBLISHED, S.PUBLISHING),
        (S.REQUESTED, S.PUBLISHED),
        (S.REQUESTED, S.RENDERED),
        (S.RENDERING, S.APPROVED),
        (S.RENDERED, S.APPROVED),
        (S.NEEDS_REVIEW, S.PUBLISHING),
        (S.APPROVED, S.PUBLISHED),
        (S.REJECTED, S.APPROVED),
        (S.TAKEN_DOWN, S.PUBLISHED),
        (S.FAILED, S.REQUESTED),
        (S.APPROVED, S.TAKEN_DOWN),
    ],
)
def test_illegal_transitions(src: JobState, dst: JobState) -> None:
    assert not can_transition(src, dst)


@pytest.mark.parametrize("state", list(JobState))
def test_no_self_loops(state: JobState) -> None:
    assert not can_transition(state, state)


@pytest.mark.parametrize("state", NON_FINAL)
def test_any_non_final_state_can_fail(state: JobState) -> None:
    assert can_transition(state, S.FAILED)


@pytest.mark.parametrize("state", [S.TAKEN_DOWN, S.FAILED])
def test_terminal_states_have_no_exit(state: JobState) -> None:
    assert TRANSITIONS[state] == frozenset()


def test_rejected_only_exits_to_review_on_appeal() -> None:
    # A lead reopens an automatic likeness rejection (review queue, four eyes); the
    # pipeline itself never leaves rejected, so it stays a final state.
    assert TRANSITIONS[S.REJECTED] == frozenset({S.NEEDS_REVIEW})
    assert S.REJECTED in FINAL_STATES


def test_published_only_exits_to_taken_down() -> None:
    assert TRANSITIONS[S.PUBLISHED] == frozenset({S.TAKEN_DOWN})


def test_final_states() -> None:
    assert frozenset({S.PUBLISHED, S.REJECTED, S.TAKEN_DOWN, S.FAILED}) == FINAL_STATES


def test_every_state_reachable_from_requested() -> None:
    seen = {S.REQUESTED}
    frontier = [S.REQUESTED]
    while frontier:
        for nxt in TRANSITIONS[frontier.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    assert seen == set(JobState)


@pytest.mark.parametrize("state", NON_FINAL)
def test_every_non_final_state_can_reach_a_final_state_without_failing(state: JobState) -> None:
    seen = {state}
    frontier = [state]
    while frontier:
        for nxt in TRANSITIONS[frontier.pop()] - {S.FAILED}:
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    assert seen & (FINAL_STATES - {S.FAILED})


def test_sources_of_matches_table() -> None:
    for dst in JobState:
        assert sources_of(dst) == {s for s in JobState if can_transition(s, dst)}
    assert sources_of(S.PUBLISHING) == {S.APPROVED}
    assert sources_of(S.APPROVED) == {S.MODERATING, S.NEEDS_REVIEW}
    assert sources_of(S.REQUESTED) == frozenset()
    assert sources_of(S.NEEDS_REVIEW) == {S.MODERATING, S.REJECTED}
