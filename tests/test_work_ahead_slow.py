"""The session's prompt on a machine too slow for the full prompt: the embedded default model with the
speed a 0.5B model measures on two cores, and a prefix-suffix-middle prompt (as Qwen2.5-Coder's)."""

import argparse
import asyncio
import dataclasses
import time
from pathlib import Path

import pytest
import torch

from hirope_lsp.completion.prompt import ContextSettings
from hirope_lsp.config import Settings
from hirope_lsp.hierarchy.document import Change
from hirope_lsp.model.engine import EngineSettings, Speed
from hirope_lsp.model.loading import load_model
from hirope_lsp.session import MIN_FAST_BUDGET, Session

LONG = Path(argparse.__file__).read_text(encoding="utf-8")  # any budget fills
URI = "file:///w/long.py"
LINE = 1500


class SpeedOf05B(Speed):
    """A 0.5B model's prefill and decode on two cores, kept whatever the small model takes."""

    def __init__(self):
        super().__init__(prefill_s=0.006, decode_s=0.15)

    def record_prefill(self, tokens: int, seconds: float) -> None:
        pass

    def record_decode(self, steps: int, seconds: float) -> None:
        pass


@pytest.fixture(scope="module")
def loaded_psm():
    torch.set_num_threads(1)
    model, tokenizer, fim = load_model(None, device="cpu", dtype="float32")
    return model, tokenizer, dataclasses.replace(fim, order="psm")


@pytest.fixture
async def slow(loaded_psm):
    # decoding a suggestion alone takes longer than the latency target: no prefill fits in it
    session = Session(Settings(engine=EngineSettings(measure_speed=False), max_new_tokens=4,
                               context=ContextSettings(budget_tokens=1024, cross_file=False), latency_target_ms=1200),
                      loaded=loaded_psm)
    session.load_model()
    (await session.ready_service()).engine.speed = SpeedOf05B()
    session.open(URI, LONG, 1, "python", "utf-16")
    yield session
    session.close(URI)
    await asyncio.gather(*session._tasks)
    session.worker.shutdown()


async def until(condition, timeout: float = 60.0) -> None:
    async def poll():
        while not condition():
            await asyncio.sleep(0.001)
    await asyncio.wait_for(poll(), timeout)


async def warmed(session: Session, line: int, character: int) -> dict:
    session.point(URI, line, character)
    while session.warming:
        await asyncio.sleep(0.01)
    return session.report()


def end_of(line: int) -> tuple[int, int]:
    return line, len(LONG.split("\n")[line])


async def test_a_cold_request_gets_the_short_prompt(slow: Session):
    suggestion = await slow.complete(URI, *end_of(LINE))
    assert slow.report()["fastAnswers"] == 1 and suggestion.prompt_tokens <= MIN_FAST_BUDGET


async def test_a_fully_warmed_cursor_is_answered_by_the_full_prompts_suggestion(slow: Session):
    before = await warmed(slow, *end_of(LINE))
    assert before["suggestedAhead"] == 2  # the short prompt's first, then the full one's
    suggestion = await slow.complete(URI, *end_of(LINE))
    after = slow.report()
    assert suggestion.source == "prefetched" and after["computedTokens"] == 0 and after["fastAnswers"] == 0
    service = await slow.ready_service()
    full = service.run(service.prepare(slow.document(URI), *end_of(LINE)))
    assert len(full.job.prompt.token_ids) > 512 and full.generation.computed_tokens <= 2
    assert suggestion.text == full.text


async def test_after_a_keystroke_the_short_prompt_keeps_the_warmed_prefix(slow: Session):
    # the keystroke moves the whole suffix (it follows the prefix): more than prefills in time
    before = await warmed(slow, *end_of(LINE))
    line, character = end_of(LINE)
    slow.change(URI, [Change("x_", ((line, character), (line, character)))], 2)
    suggestion = await slow.complete(URI, line, character + 2)
    after = slow.report()
    assert after["fastAnswers"] == 1 and suggestion.prompt_tokens > 512
    assert after["computedTokens"] <= MIN_FAST_BUDGET
    # all but the suffix and the short prompt the first suggestion made ahead read
    assert after["warmedUsedTokens"] >= before["warmedTokens"] - 200 - MIN_FAST_BUDGET


async def test_the_cut_keeps_a_suffix_warmed_in_part(slow: Session):
    from hirope_lsp.session import _with_suffix_cut

    service = await slow.ready_service()
    job = service.prepare(slow.document(URI), *end_of(LINE))
    suffix_start = service.engine.prefix_end(job.prompt.token_ids) + 1
    cached = suffix_start + 40  # warming was stopped 40 tokens into the suffix
    cut = _with_suffix_cut(service.engine, job, cached, affordable=20)
    assert len(cut.prompt.token_ids) == cached + 20, "all that is cached, then what prefills in time"
    assert cut.prompt.token_ids[:cached] == job.prompt.token_ids[:cached]
    assert _with_suffix_cut(service.engine, job, suffix_start - 30, affordable=20) is None, "the prefix is not cached"


async def test_a_request_for_the_state_a_suggestion_is_being_made_for_waits_for_it(slow: Session):
    line, character = end_of(LINE)
    slow.point(URI, line, character)
    await until(lambda: URI in slow.ahead)  # the short prompt's suggestion is being made
    suggestion = await slow.complete(URI, line, character)
    report = slow.report()
    assert suggestion.source == "prefetched" and report["prefetchedAnswers"] == 1
    assert report["computedTokens"] == 0 and report["warmPreempted"] == 0, "the request did not start over"


async def test_a_request_that_waits_for_a_suggestion_being_made_cuts_its_decoding_at_the_latency_target(slow: Session):
    line, character = end_of(LINE)
    slow.point(URI, line, character)
    await until(lambda: URI in slow.ahead)
    work = slow.ahead[URI]
    assert work.answer_by is None, "alone, it decodes for as long as work ahead may"
    asked = time.perf_counter()
    suggestion = await slow.complete(URI, line, character)
    target = slow.settings.latency_target_ms / 1000
    assert suggestion.source == "prefetched"
    assert asked + target <= work.answer_by <= time.perf_counter() + target


async def test_a_request_for_another_state_stops_the_suggestion_being_made(slow: Session):
    line, character = end_of(LINE)
    slow.point(URI, line, character)
    await until(lambda: URI in slow.ahead)
    suggestion = await slow.complete(URI, line - 1, 0)
    report = slow.report()
    assert suggestion.source == "model" and report["computedTokens"] > 0 and report["prefetchedAnswers"] == 0
    assert report["suggestedAhead"] == 0, "the suggestion being made was stopped, not finished first"


async def test_an_edit_while_a_suggestion_is_made_ahead_keeps_it_from_answering_the_new_text(slow: Session):
    line, character = end_of(LINE)
    slow.point(URI, line, character)
    await until(lambda: URI in slow.ahead)
    last = LONG.count("\n")
    slow.change(URI, [Change("# an edit below the cursor\n", ((last, 0), (last, 0)))], 2)  # the cursor's byte stays
    await until(lambda: not slow.warming)
    suggestion = await slow.complete(URI, line, character)
    assert suggestion.source == "model" and slow.report()["prefetchedAnswers"] == 0


async def test_work_ahead_yields_to_a_request_waiting_for_other_work_ahead(slow: Session):
    from hirope_lsp.session import AheadWork

    loop = asyncio.get_running_loop()
    joined, other = AheadWork(b"a", 0, loop.create_future()), AheadWork(b"b", 0, loop.create_future())
    assert not slow._yield_to_requests() and not slow._yield_to_requests(joined)
    slow.joined.append(joined)
    assert slow._yield_to_requests(), "a prefill stops for it"
    assert slow._yield_to_requests(other), "so does another suggestion being made"
    assert not slow._yield_to_requests(joined), "the work it waits for goes on"
    slow.joined.remove(joined)


async def test_a_short_prompts_suggestion_answering_leaves_the_full_prompt_to_warm(slow: Session):
    line, character = end_of(LINE)
    slow.point(URI, line, character)
    service = await slow.ready_service()
    await until(lambda: slow.prefetched.covers(slow.document(URI), slow.document(URI).offset_at(line, character)[1]))
    suggestion = await slow.complete(URI, line, character)  # answered by the short prompt's suggestion
    assert suggestion.source == "prefetched"
    await until(lambda: not slow.warming and not slow._tasks)  # the prefetch, then the warming when idle
    full = service.prepare(slow.document(URI), line, character)
    assert service.engine.is_warm(full.prompt), "the full prompt warmed after the answer"


async def answered_and_prefetching(session: Session) -> tuple[str, int, int]:
    """A suggestion answered at the end of ``LINE`` (the gate off), and the one after its accept being made."""
    from hirope_lsp.config import GATE_OFF

    (await session.ready_service()).min_confidence = GATE_OFF
    line, character = end_of(LINE)
    suggestion = await session.complete(URI, line, character)
    assert suggestion.text, "the model suggested nothing here; pick another line"
    await until(lambda: URI in session.ahead)  # after the pause, the suggestion that follows the accept
    assert session.report()["suggestedAhead"] == 0
    return suggestion.text, line, character


async def test_typing_away_from_an_accept_stops_the_suggestion_being_made_for_it(slow: Session):
    text, line, character = await answered_and_prefetching(slow)
    other = "Q" if not text.startswith("Q") else "W"  # not the suggestion's start: the accept will not come
    slow.change(URI, [Change(other, ((line, character), (line, character)))], 2)
    await until(lambda: URI not in slow.ahead)
    assert slow.report()["suggestedAhead"] == 0, "stopped at the next layer or step, not made for nothing"


async def test_typing_along_a_suggestion_keeps_the_one_after_its_accept_being_made(slow: Session):
    text, line, character = await answered_and_prefetching(slow)
    slow.change(URI, [Change(text[0], ((line, character), (line, character)))], 2)  # the suggestion's start
    await until(lambda: URI not in slow.ahead)
    assert slow.report()["suggestedAhead"] == 1, "the accept can still come"
