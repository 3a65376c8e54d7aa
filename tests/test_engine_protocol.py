"""Every engine satisfies `fluxserve.engine.protocol.Engine`: the real FLUX engine on the tiny model, and
the fake that bench/load.py uses. The last test runs a job through the real worker on each, so neither
can drift from what the worker calls."""

from __future__ import annotations

import inspect
import io
import time
from pathlib import Path

import pytest
from PIL import Image

from fluxserve.config import Settings
from fluxserve.contract import GenerateRequest, JobState
from fluxserve.engine import GenerationCancelled, GenerationParams, load_engine
from fluxserve.engine.fake import SleepingEngine
from fluxserve.engine.protocol import Engine
from fluxserve.jobs import Job, Lease, new_job_id
from fluxserve.jobs.sqlite import SqliteJobStore
from fluxserve.outputs.local import LocalOutputStore
from fluxserve.progress import PREVIEW_RECHECK_SECONDS, PreviewSink, ProgressReporter
from fluxserve.worker import Worker

from conftest import SLUG


def run_one_job(root: Path, engine: Engine, request: GenerateRequest,
                watched: bool = False) -> tuple[Job, bytes | None]:
    """Submit one job to a fresh SQLite store, let a worker on `engine` run it; the ended job and its media.
    `watched`: someone follows its previews (as an SSE client with ?preview=true would mark it).

    The one place that builds a store, a job, an output store and a worker."""
    store = SqliteJobStore(root / "jobs.sqlite3")
    outputs = LocalOutputStore(root / "outputs")
    try:
        worker = Worker(store, outputs, engine, lease_seconds=30)
        job = store.submit(Job(id=new_job_id(), slug=SLUG, params=request))
        if watched:
            store.watch_previews(job.id, 60)
        assert worker.run_once()
        ended = store.get(job.id)
        return ended, outputs.get(ended.result.output_key) if ended.result else None
    finally:
        store.close()


@pytest.fixture(scope="module", params=["flux-tiny", "fake-sleep"])
def engine(request) -> Engine:
    if request.param == "fake-sleep":
        return SleepingEngine(0.01)
    # A preview before every step, so the callback order is checked at each one.
    return load_engine(Settings(model=str(request.getfixturevalue("tiny_model")), speed_preview_every=1))


def params(width: int = 136, height: int = 120, steps: int = 3) -> GenerationParams:
    return GenerationParams(prompt="a cat", width=width, height=height, steps=steps, seed=7, guidance=3.5)


def test_satisfies_the_protocol(engine):
    assert isinstance(engine, Engine)  # runtime_checkable: the members exist
    assert isinstance(engine.description, str) and engine.description
    for name in ("generate", "metrics"):
        expected = list(inspect.signature(getattr(Engine, name)).parameters.values())[1:]  # less `self`
        actual = list(inspect.signature(getattr(engine, name)).parameters.values())
        assert [(p.name, p.kind, p.default) for p in actual] == [(p.name, p.kind, p.default) for p in expected]
    assert isinstance(engine.metrics(), dict)


def test_exact_size_with_progress_and_previews(engine):
    events: list[tuple] = []
    image = engine.generate(
        params(),
        on_step=lambda step, total: events.append(("step", step, total)),
        on_preview=lambda preview: events.append(("preview", preview)),
    )
    assert isinstance(image, Image.Image) and image.size == (136, 120)

    steps = [event[1:] for event in events if event[0] == "step"]
    assert [step for step, _ in steps] == list(range(1, len(steps) + 1))
    assert steps and steps[-1][0] == steps[-1][1]
    # A preview just before each progress call.
    assert [event[0] for event in events] == ["preview", "step"] * len(steps)
    assert all(isinstance(event[1], Image.Image) for event in events if event[0] == "preview")


class Unwatched:
    """An `on_preview` nobody watches: the engine must not call it."""

    def __init__(self) -> None:
        self.asked = 0

    def watched(self) -> bool:
        self.asked += 1
        return False

    def __call__(self, image) -> None:
        raise AssertionError("a preview was made while nobody watched")


def test_no_previews_while_unwatched(engine):
    steps: list[int] = []
    sink = Unwatched()
    image = engine.generate(params(), on_step=lambda step, total: steps.append(step), on_preview=sink)
    assert image.size == (136, 120) and steps == [1, 2, 3] and sink.asked >= 1


def test_cancelling_from_on_step_stops_it(engine):
    calls = []

    def cancel(step: int, total: int) -> None:
        calls.append(step)
        raise GenerationCancelled()

    with pytest.raises(GenerationCancelled):
        engine.generate(params(steps=4), on_step=cancel)
    assert calls == [1]


def test_a_job_runs_through_the_worker(engine, tmp_path):
    request = GenerateRequest(positivePrompt="a cat", width=128, height=128, steps=2)
    job, media = run_one_job(tmp_path, engine, request)
    assert job.state is JobState.COMPLETED, job.error
    assert media is not None and Image.open(io.BytesIO(media)).size == (128, 128)
    assert engine.metrics().items() <= job.result.metrics.items()


@pytest.mark.parametrize("watched", [False, True])
def test_the_worker_stores_a_preview_only_while_watched(engine, tmp_path, watched):
    request = GenerateRequest(positivePrompt="a cat", width=128, height=128, steps=2)
    job, _ = run_one_job(tmp_path, engine, request, watched=watched)
    assert job.state is JobState.COMPLETED and job.progress is not None
    assert ("preview" in job.progress) is watched


# A watcher's marker: long enough past the re-ask that a busy machine's pause cannot outlast it.
MARKER_SECONDS = 3.0


def test_the_reporter_asks_the_store_at_most_twice_a_second(tmp_path):
    store = SqliteJobStore(tmp_path / "jobs.sqlite3")
    try:
        store.submit(Job(id=new_job_id(), slug=SLUG, params=GenerateRequest(positivePrompt="a cat")))
        job, lease = store.claim("w")
        reporter = ProgressReporter(store, lease, job, total=4)
        assert not reporter.previews_watched()  # the first call asks
        marked = time.monotonic()
        store.watch_previews(job.id, MARKER_SECONDS)
        assert not reporter.previews_watched()  # the answer is kept for PREVIEW_RECHECK_SECONDS
        time.sleep(PREVIEW_RECHECK_SECONDS)
        assert reporter.previews_watched()
        PreviewSink(reporter)(Image.new("RGB", (8, 8)))
        assert "preview" in reporter.snapshot(1)
        # The marker lapses (the watcher went away), and the kept answer is asked again.
        time.sleep(max(0.0, marked + MARKER_SECONDS - time.monotonic()) + PREVIEW_RECHECK_SECONDS)
        assert not reporter.previews_watched()
        assert "preview" not in reporter.snapshot(2)  # the last picture is not carried on
    finally:
        store.close()


def test_a_store_error_means_unwatched():
    class Broken:
        def previews_watched(self, job_id: str) -> bool:
            raise ConnectionError("store down")

    job = Job(id=new_job_id(), slug=SLUG, params=GenerateRequest(positivePrompt="a cat"))
    assert not ProgressReporter(Broken(), Lease(job.id, "t"), job, total=4).previews_watched()
