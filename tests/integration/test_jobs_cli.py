"""An operator's view of jobs, through the `assay` command against a real nats-server, the real services and a real
site worker (its containers played by FakeRunner): a job whose image is missing is refused with the reason, which
`assay jobs show` gives with what to do, and `assay dead-letters list` shows the operator where it was set aside; once
the image is loaded, `assay jobs retry` runs it again and its result is counted once."""

from __future__ import annotations

import asyncio
import time

from contracts import messages as m
from tests.integration.test_checks_cli import until
from tests.integration.test_consent_cli import cli
from tests.support.federation import MODEL, Federation, fake_containers, next_events

METRICS = {"auc": 0.8, "sensitivity": 0.7}


async def test_a_job_refused_for_a_missing_image_is_retried_once_it_is_loaded_and_counted_once(
        federation: Federation):
    fed = federation
    runner = fake_containers(METRICS)
    runner._images.pop(MODEL)  # the site's engine lacks the model's image, which was never pushed
    await fed.start_site("site-a", runner)
    await fed.benchmark()
    await fed.model("model-1")
    await fed.dataset("site-a", "ds-a")

    listed = await until(fed, "REFUSED", "jobs", "list", "--benchmark", "bench", "--state", "REFUSED")
    for _ in range(100):  # the dataset's check (the reference model's image is missing too) and the job
        refused = m.JobList.model_validate(await fed.send(m.ListJobs(state=m.JobState.REFUSED), None)).jobs
        if len(refused) == 2:
            break
        await asyncio.sleep(0.2)
    job = next(j for j in refused if j.check is None)
    code, shown = await cli(fed, "jobs", "show", job.job_id[:13])
    assert code == 0 and f"image {MODEL}: not present at this site" in shown, shown[:600]
    assert "load it here (`docker load`), then retry the job" in shown
    assert f"assay job retry {job.job_id}" in shown and "its site took it 1 time(s)" in shown
    assert "REFUSED" in listed

    letters = await until(fed, "site-site-a-jobs", "dead-letters", "list", "--as", "operator")
    assert "not present at this site" in letters  # the site set the job aside, and the operator sees why
    code, refused = await cli(fed, "dead-letters", "list", "--as", "owner")
    assert code == 1 and "this command needs operator" in refused
    set_aside = m.DeadLetterList.model_validate(await fed.send(m.ListDeadLetters(consumer="site-site-a-jobs"),
                                                               "operator")).letters[0]
    code, refused = await cli(fed, "dead-letters", "replay", set_aside.letter_id[:8], "--as", "operator")
    assert code == 1 and f"`assay job retry {set_aside.message_id} --as ME`" in refused, refused  # not replayed

    runner.add_image(MODEL)  # the operator loads the image
    code, said = await cli(fed, "jobs", "retry", "--failed", "--benchmark", "bench", "--as", "owner")
    assert code == 0 and "2 job(s) sent again" in said, said  # the dataset's check (its reference model) and the job
    (accepted,) = await next_events(fed.nats_url, "assay.v1.evt.result.accepted", 1)
    assert accepted["data"]["job_id"] == f"{job.job_id}-r1"
    code, again = await cli(fed, "jobs", "retry", job.job_id, "--as", "operator")
    assert code == 1 and f"job {job.job_id} was retried already" in again
    code, shown = await cli(fed, "jobs", "show", f"{job.job_id[:13]}-r1")
    assert code == 0 and "DONE" in shown, shown

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (board := await fed.board()).rows:
        await asyncio.sleep(0.2)
    [row] = board.rows
    assert (row.model_id, row.sites, row.case_count) == ("model-1", 1, 2)  # counted once
