"""The consent rules as plain functions, and properties over any sequence of actions: nobody approves their own
request, a revoked pair is not scheduled, and no history entry is ever lost or changed."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from approval.consent import (
    Action,
    Pair,
    Policy,
    Refusal,
    Status,
    accept,
    approve,
    checked,
    invite,
    reject,
    request,
    revoke,
)

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def fresh(benchmark_owner: str = "committee", entity_owner: str = "vendor") -> Pair:
    return Pair(benchmark_owner=benchmark_owner, entity_owner=entity_owner, entity="model m1", benchmark="b")


def test_a_request_approved_by_the_benchmark_owner_is_scheduled_and_both_entries_kept():
    pair = approve(request(fresh(), "vendor", NOW), "committee", NOW)

    assert pair.status is Status.APPROVED and pair.schedulable
    assert [(e.action, e.actor) for e in pair.history] == [(Action.REQUESTED, "vendor"), (Action.APPROVED, "committee")]


def test_a_rejection_needs_a_reason_and_a_new_request_may_follow_it():
    asked = request(fresh(), "vendor", NOW)
    with pytest.raises(Refusal, match="give a reason"):
        reject(asked, "committee", " ", NOW)
    rejected = reject(asked, "committee", "image too large for the sites", NOW)
    assert rejected.status is Status.REJECTED and rejected.history[-1].reason == "image too large for the sites"
    assert request(rejected, "vendor", NOW).status is Status.REQUESTED


def test_either_side_revokes_and_the_pair_stops_being_scheduled():
    approved = approve(request(fresh(), "vendor", NOW), "committee", NOW)
    for side in ("vendor", "committee"):
        revoked = revoke(approved, side, "consent withdrawn", NOW)
        assert revoked.status is Status.REVOKED and not revoked.schedulable
    with pytest.raises(Refusal, match="only committee or vendor"):
        revoke(approved, "stranger", "no", NOW)


def test_an_accepted_invitation_is_the_two_consents_and_an_invitation_may_be_declined():
    invited = invite(fresh(), "committee", NOW)
    assert accept(invited, "vendor", NOW).schedulable
    assert request(invited, "vendor", NOW).schedulable  # asking on an invitation accepts it
    declined = reject(invited, "vendor", "not this year", NOW)
    assert declined.status is Status.REJECTED
    with pytest.raises(Refusal, match="only committee, who was asked"):
        reject(request(fresh(), "vendor", NOW), "vendor", "changed my mind", NOW)


def test_a_policy_approves_the_allowed_at_once_and_leaves_others_to_the_owner():
    allow = Policy(mode="allow", allowed=frozenset({"vendor"}))
    approved = request(fresh(), "vendor", NOW, allow)
    assert approved.schedulable and approved.history[-1].by_policy and approved.history[-1].actor == "committee"
    assert request(fresh(entity_owner="other"), "other", NOW, allow).status is Status.REQUESTED
    assert request(fresh(entity_owner="other"), "other", NOW, Policy(mode="always")).schedulable


def test_an_allow_list_may_name_an_organisation_whose_actors_it_then_approves():
    allow = Policy(mode="allow", allowed=frozenset({"uh-leeds"}))
    assert request(fresh(entity_owner="leeds-site"), "leeds-site", NOW, allow, organisation="uh-leeds").schedulable
    assert not request(fresh(entity_owner="york"), "york", NOW, allow, organisation="uh-york").schedulable


def test_nobody_approves_their_own_request_even_holding_both_sides():
    both = fresh(benchmark_owner="hospital", entity_owner="hospital")
    asked = request(both, "hospital", NOW, Policy(mode="always"))
    assert asked.status is Status.REQUESTED  # the policy does not approve its owner's own request
    with pytest.raises(Refusal, match="nobody may approve their own request"):
        approve(asked, "hospital", NOW)


ACTORS = ("committee", "vendor", "stranger")
ACTIONS = st.lists(st.tuples(st.sampled_from(("request", "invite", "accept", "approve", "reject", "revoke")),
                             st.sampled_from(ACTORS), st.sampled_from(("never", "always", "allow"))), max_size=25)


def step(pair: Pair, action: str, actor: str, mode: str) -> Pair:
    policy = Policy(mode=mode, allowed=frozenset({"vendor"}))
    return {"request": lambda: request(pair, actor, NOW, policy), "invite": lambda: invite(pair, actor, NOW),
            "accept": lambda: accept(pair, actor, NOW), "approve": lambda: approve(pair, actor, NOW),
            "reject": lambda: reject(pair, actor, "a reason", NOW),
            "revoke": lambda: revoke(pair, actor, "a reason", NOW)}[action]()


@settings(max_examples=300, deadline=None)
@given(ACTIONS, st.booleans())
def test_no_sequence_self_approves_schedules_after_a_revoke_or_loses_history(actions, same_owner):
    pair = fresh(entity_owner="committee" if same_owner else "vendor")
    for action, actor, mode in actions:
        before = pair
        try:
            pair = step(pair, action, actor, mode)
        except Refusal:
            assert pair == before  # a refusal changes nothing
            continue
        assert pair.history[:len(before.history)] == before.history  # append-only: nothing lost, nothing changed
        assert len(pair.history) > len(before.history)
        if pair.history[-1].action is Action.REVOKED:
            assert not pair.schedulable
        if action == "revoke":
            assert pair.status is Status.REVOKED
    asked_by = None
    for entry in pair.history:  # every approval answers a request someone else made
        if entry.action in (Action.REQUESTED, Action.INVITED):
            asked_by = entry.actor
        if entry.action in (Action.APPROVED, Action.ACCEPTED):
            assert entry.actor != asked_by
    if same_owner:  # one actor holding both sides can never give both consents
        assert not pair.schedulable


CHECKED_ACTIONS = st.lists(st.tuples(
    st.sampled_from(("request", "invite", "accept", "approve", "override", "reject", "revoke", "fail", "pass")),
    st.sampled_from(ACTORS), st.sampled_from(("never", "always", "allow"))), max_size=25)


@settings(max_examples=300, deadline=None)
@given(CHECKED_ACTIONS)
def test_no_sequence_approves_a_failed_check_without_an_override_nor_lets_a_policy_approve_one(actions):
    """Each request runs a check: pending until it fails or passes. A policy approves only once it passed; the
    benchmark's owner approves a failed one only with an override, and the history says so."""
    pair, check = fresh(), None
    for action, actor, mode in actions:
        policy = Policy(mode=mode, allowed=frozenset({"vendor"}))
        before = pair
        try:
            if action == "request":
                pair = request(pair, actor, NOW, policy, checking=True)
                check = "pending" if pair.history[-1].action is Action.REQUESTED else check
            elif action in ("fail", "pass"):
                if check != "pending":
                    continue
                check = {"fail": "failed", "pass": "passed"}[action]
                pair = checked(pair, NOW, policy) if action == "pass" else pair
            elif action == "invite":
                pair = invite(pair, actor, NOW, "it crashed" if check == "failed" else None)
            elif action in ("approve", "override"):
                pair = approve(pair, actor, NOW, "why" if action == "override" else "",
                               "it crashed" if check == "failed" else None)
            else:
                pair = step(pair, action, actor, mode)
        except Refusal:
            assert pair == before
            continue
        new = pair.history[len(before.history):]
        assert pair.history[:len(before.history)] == before.history
        for entry in new:
            if entry.action is Action.APPROVED and entry.by_policy:
                assert action == "pass"  # a policy approves a checked request only once its check passed
            if entry.action is Action.APPROVED and check == "failed":
                assert action == "override" and entry.reason == "check overridden: why"
