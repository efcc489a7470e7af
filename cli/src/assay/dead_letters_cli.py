"""`assay dead-letters replay`: once the cause of a dead letter is fixed (a bug fixed and its service redeployed, what
its message refers to registered), the operator has its message run again by the consumer that gave up on it. The
letter is read from the scheduler; the service that owns its consumer replays it and says what became of it."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from assay.home import speak_as
from contracts import messages as m
from contracts import subjects
from contracts.catalog import replay_subject, service_of

console = Console()
DONE = (m.ReplayOutcome.PROCESSED, m.ReplayOutcome.ALREADY_PROCESSED)


def not_replayable(letter: m.DeadLetterView) -> str | None:
    """Why `letter` cannot be replayed, and what to do instead; None if it can."""
    if subjects.site_of_queue(letter.consumer) is not None:
        return (f"it is a site's job, which is run again as a new round: `assay job retry {letter.message_id} "
                "--as ME` (`assay job show` says whether it may be)")
    if letter.stream is None or letter.sequence is None:
        return ("its message never reached a stream (the server refused it for good), or the letter is older than "
                "replays and does not say where its message is; nothing can run it again")
    if service_of(letter.consumer) is None:
        return f"no service owns consumer {letter.consumer}"
    return None


def processed(letter: m.DeadLetterView) -> m.LetterReplay | None:
    """The replay that had its message processed (or found it processed), if one did: nothing is to be done again."""
    return next((replay for replay in reversed(letter.replays) if replay.outcome in DONE), None)


def letters(actor: str, letter_id: str | None, consumer: str | None) -> tuple[m.DeadLetterView, ...]:
    from assay.cli import _send, say_error

    listed = m.DeadLetterList.model_validate(_send(m.ListDeadLetters(
        letter_id=letter_id, consumer=consumer, limit=2 if letter_id else 1000), actor)).letters
    if letter_id is not None and len(listed) != 1:
        say_error(f"dead letter {letter_id}: " + ("more than one begins with it; give more of its id" if listed else
                                                  "none has it; `assay dead-letters list --as ME` shows them"))
        raise typer.Exit(1)
    return listed


async def replay(letter: m.DeadLetterView, actor: str) -> tuple[bool, str]:
    """Ask the service that owns the letter's consumer to replay it: whether it did what was asked, and its word."""
    from assay.cli import _home
    from assay.client import CommandFailed, request

    assert letter.stream is not None and letter.sequence is not None
    home, service = _home(), service_of(letter.consumer)
    assert service is not None
    command = m.ReplayDeadLetter(letter_id=letter.letter_id, consumer=letter.consumer, stream=letter.stream,
                                 sequence=letter.sequence, message_id=letter.message_id)
    try:
        reply = await request(home.nats_url(), command, actor=actor, key=home.key(actor),
                              subject=replay_subject(service))
    except CommandFailed as exc:
        return False, str(exc)
    return True, str(reply["message"])


def dead_letters_replay(actor: Annotated[str, typer.Option("--as", help="the operator's key", callback=speak_as)],
                        letter_id: Annotated[str | None, typer.Argument(help="the letter (any unique start)")] = None,
                        every: Annotated[bool, typer.Option("--all", help="every letter not processed yet, oldest "
                                                                          "first (narrowed by --consumer)")] = False,
                        consumer: Annotated[str | None, typer.Option(help="with --all: one consumer's letters")
                                            ] = None) -> None:
    """Run a dead letter's message again through the consumer that gave up on it, once the cause is fixed: it is
    processed once, with the same checks, however often it is replayed (operator)."""
    from assay.cli import say_error

    if (letter_id is None) == (not every) or (consumer is not None and not every):
        say_error("name one letter ID, or give --all (with --consumer C to narrow it)")
        raise typer.Exit(2)
    chosen = sorted(letters(actor, letter_id, consumer), key=lambda letter: letter.at)  # in the order they came:
    failed = 0  # an actor's registration before what it did
    for letter in chosen:
        short = letter.letter_id[:8]
        if (why := not_replayable(letter)) is not None:
            if letter_id is not None:
                say_error(f"dead letter {short} of {letter.consumer} is not replayed: {why}")
                raise typer.Exit(1)
            console.print(f"[yellow]skipped[/yellow] {short} ({escape(letter.consumer)}): {escape(why)}",
                          highlight=False)
            continue
        if (done := processed(letter)) is not None:
            console.print(f"[green]ok[/green] {short} ({escape(letter.consumer)}): its message was processed already "
                          f"(replayed {done.at:%Y-%m-%d %H:%M:%S} by {escape(done.replayed_by)}); nothing was done "
                          "again", highlight=False)
            continue
        try:
            ok, said = asyncio.run(replay(letter, actor))
        except (FileNotFoundError, ConnectionError) as exc:
            say_error(str(exc))
            raise typer.Exit(1) from exc
        if ok:
            console.print(f"[green]ok[/green] {escape(said)}", highlight=False)
        else:
            failed += 1
            say_error(said)
    if every:
        console.print(f"{len(chosen)} letter(s) looked at, {failed} not processed"
                      + ("; `assay dead-letters show ID --as ME` gives each whole" if failed else ""), highlight=False)
    if failed:
        raise typer.Exit(1)
