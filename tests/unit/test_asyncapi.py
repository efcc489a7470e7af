"""The AsyncAPI document: committed and current, and it names a publisher for every event and an answer for every
request, with the payload each carries."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

from assay.asyncapi import DOCUMENT, document, render
from contracts import subjects
from contracts.catalog import EVENT_SUBJECTS, REPLY_TYPES, REQUEST_SUBJECTS


def operations(doc: dict[str, Any], action: str) -> dict[str, dict[str, Any]]:
    """Channel address -> the operation's channel, for every operation of `action` (send or receive)."""
    found = {}
    for operation in doc["operations"].values():
        if operation["action"] == action:
            channel = doc["channels"][unquote(operation["channel"]["$ref"].rsplit("/", 1)[1])]
            found.setdefault(channel["address"], []).append(operation)
    return found


def payload_of(doc: dict[str, Any], channel: dict[str, Any]) -> str:
    [message] = channel["messages"].values()
    name = unquote(message["$ref"].rsplit("/", 1)[1])
    return unquote(doc["components"]["messages"][name]["payload"]["$ref"].rsplit("/", 1)[1])


def test_the_committed_asyncapi_document_is_current() -> None:
    assert DOCUMENT.read_text() == render(), "the wiring changed: run `just asyncapi` and commit contracts/asyncapi/"


def test_every_event_has_a_publisher_and_every_request_a_consumer_and_its_replies() -> None:
    doc = document()
    sent, received = operations(doc, "send"), operations(doc, "receive")
    assert set(EVENT_SUBJECTS.values()) <= set(sent)
    for request, subject in REQUEST_SUBJECTS.items():
        [operation] = received[subject]
        replies = {ref["$ref"].rsplit("/", 1)[1] for ref in operation["reply"]["messages"]}
        assert replies == {REPLY_TYPES[request].__name__, "CommandReply"}


def test_a_site_result_travels_on_its_sites_subject_to_the_leaderboard() -> None:
    doc = document()
    channels = doc["channels"]
    results = channels["leaderboard-results"]
    assert results["address"] == subjects.RESULTS_ALL and payload_of(doc, results) == "Envelope[SiteResult]"
    site = channels["site-{site_id}:SiteResult"]
    assert site["address"] == "assay.v1.results.{site_id}" and "site_id" in site["parameters"]
    jobs = channels["site-{site_id}-jobs"]
    assert jobs["address"] == "assay.v1.jobs.{site_id}" and payload_of(doc, jobs) == "Envelope[JobSpec]"


def test_each_service_declares_exactly_the_events_the_contracts_say_it_publishes() -> None:
    import importlib

    from contracts.catalog import EVENT_PUBLISHERS, SERVICES

    for service in SERVICES:
        wiring = importlib.import_module(f"{service}.handlers").WIRING
        declared = {outlet.payload for outlet in wiring.publishes if outlet.subject in EVENT_SUBJECTS.values()}
        assert declared == {event for event, publisher in EVENT_PUBLISHERS.items() if publisher == service}, service
