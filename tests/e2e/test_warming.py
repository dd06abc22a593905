"""Work done ahead of the user, through the real server over stdio: prompts warmed where the editor
says the cursor is, requests served before warming, a short prompt while the full one warms on a
slow machine, and the suggestion after an accept prefetched."""

import argparse
import asyncio
import time
from pathlib import Path

import pytest
import pytest_lsp
from e2e.data import SERVER
from lsprotocol import types
from pytest_lsp import ClientServerConfig, LanguageClient, client_capabilities

from hirope_lsp.config import GATE_OFF

from e2e.test_server import inline, open_doc, type_text

pytestmark = pytest.mark.e2e

LONG = Path(argparse.__file__).read_text(encoding="utf-8")  # ~2,700 lines: any budget fills


async def start(lsp_client: LanguageClient, workspace, **options):
    lsp_client.workspace_root = workspace
    await lsp_client.initialize_session(types.InitializeParams(
        capabilities=client_capabilities("visual-studio-code"), root_uri=workspace.as_uri(),
        workspace_folders=[types.WorkspaceFolder(uri=workspace.as_uri(), name="ws")],
        initialization_options={"maxNewTokens": 16, "crossFile": False, "minConfidence": GATE_OFF, **options}))
    await wait_ready(lsp_client)


async def wait_ready(client) -> dict:
    for _ in range(600):
        state = await status(client)
        if state["state"] == "ready":
            return state
        await asyncio.sleep(0.05)
    raise AssertionError(f"the model did not load: {state}")


async def status(client) -> dict:
    reply = await client.protocol.send_request_async("hirope/status", {})
    return reply._asdict() if hasattr(reply, "_asdict") else reply  # pygls hands JSON objects over as named tuples


def warm(client, uri, line, character):
    client.protocol.notify("hirope/warm", {"textDocument": {"uri": uri}, "position": {"line": line, "character": character}})


async def until_idle(client, timeout=120.0) -> dict:
    """Status once no warming or prefetching is left."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = await status(client)
        if not state["warming"]:
            return state
        await asyncio.sleep(0.02)
    raise AssertionError("warming never ended")


async def until_warming_starts(client) -> None:
    """Once the server has computed the first chunk of some warming."""
    for _ in range(200):
        if (await status(client))["warmedTokens"] > 0:
            return
        await asyncio.sleep(0.01)


def cursor_in(text: str, line: int) -> tuple[int, int]:
    return line, len(text.split("\n")[line])


def mid_statement(after_line: int = 1200) -> tuple[str, int, int]:
    """The long file cut after ``self.`` on a line past ``after_line``: the model has something to say there."""
    lines = LONG.split("\n")
    line = next(i for i in range(after_line, len(lines)) if lines[i].strip().startswith("self."))
    lines[line] = lines[line][: lines[line].index("self.") + len("self.")]
    return "\n".join(lines), line, len(lines[line])


@pytest_lsp.fixture(config=ClientServerConfig(server_command=SERVER))
async def client(lsp_client: LanguageClient, workspace):
    await start(lsp_client, workspace, promptBudget=2048, latencyTargetMs=10000)
    yield
    await lsp_client.shutdown_session()


async def test_a_warmed_cursor_is_answered_by_the_suggestion_made_ahead(client: LanguageClient):
    uri = (client.workspace_root / "long.py").as_uri()
    text, line, character = mid_statement()
    open_doc(client, uri, text)
    warm(client, uri, line, character)
    warmed = await until_idle(client)
    assert warmed["warmJobs"] == 1 and warmed["warmedTokens"] > 1500 and warmed["suggestedAhead"] == 1
    assert warmed["computedTokens"] == 0  # no request has run yet
    made_ahead = await inline(client, uri, line, character)
    after = await status(client)
    assert after["prefetchedAnswers"] == 1 and after["computedTokens"] == 0  # answered without the model
    idle = await until_idle(client)  # the suggestion after its accept is prefetched meanwhile
    warm(client, uri, line, character)  # the editor says the cursor rests there again: nothing new to do
    again = await until_idle(client)
    assert again["suggestedAhead"] == idle["suggestedAhead"] and again["computedTokens"] == 0
    # what the model says there, asked directly, is what was made ahead
    client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings={"hirope": {"warmAhead": False}}))
    direct = await inline(client, uri, line, character)
    assert [i.insert_text for i in direct.items] == [i.insert_text for i in made_ahead.items]


async def test_a_warmed_prompt_is_reused_by_the_request_that_follows(client: LanguageClient):
    uri = (client.workspace_root / "long.py").as_uri()
    open_doc(client, uri, LONG)
    line, character = cursor_in(LONG, 1500)
    warm(client, uri, line, character)
    warmed = await until_idle(client)
    assert warmed["warmJobs"] == 1 and warmed["warmedTokens"] > 1500
    # keys no suggestion starts with: the one made ahead no longer applies
    await inline(client, uri, *type_text(client, uri, 2, line, character, "  # zq"))
    after = await status(client)
    assert after["prefetchedAnswers"] == 0
    assert after["computedTokens"] <= 6  # the typed keys (and the prompt's last token, a healed one)
    assert after["warmedUsedTokens"] >= warmed["warmedTokens"] - 4


async def test_a_request_during_warming_is_answered_first(client: LanguageClient):
    client.workspace_did_change_configuration(
        types.DidChangeConfigurationParams(settings={"hirope": {"promptBudget": 6144}}))
    long_uri = (client.workspace_root / "long.py").as_uri()
    small_uri = (client.workspace_root / "geometry.py").as_uri()
    open_doc(client, long_uri, LONG)
    small = (client.workspace_root / "geometry.py").read_text()
    open_doc(client, small_uri, small)
    warm(client, long_uri, *cursor_in(LONG, 2600))
    await until_warming_starts(client)
    await inline(client, small_uri, *cursor_in(small, 5))
    answered = await status(client)
    assert long_uri in answered["warming"], "the request waited for the whole warming"
    assert answered["warmPreempted"] >= 1
    done = await until_idle(client)
    assert done["warmedTokens"] > answered["warmedTokens"]  # warming went on after the request


async def test_the_document_the_user_switches_to_warms_before_the_one_they_left(client: LanguageClient):
    client.workspace_did_change_configuration(
        types.DidChangeConfigurationParams(settings={"hirope": {"promptBudget": 6144}}))
    left, entered = ((client.workspace_root / name).as_uri() for name in ("left.py", "entered.py"))
    open_doc(client, left, LONG)
    open_doc(client, entered, LONG)
    warm(client, left, *cursor_in(LONG, 2600))
    await until_warming_starts(client)
    warm(client, entered, *cursor_in(LONG, 2600))  # the user switches documents
    deadline = time.monotonic() + 120
    while entered in (state := await status(client))["warming"]:
        assert time.monotonic() < deadline, "the entered document never warmed"
        await asyncio.sleep(0.02)
    assert left in state["warming"], "the document the user left finished warming first"
    assert state["warmPreempted"] >= 1
    done = await until_idle(client)
    assert done["warmJobs"] >= 3 and done["warmedTokens"] > state["warmedTokens"]  # then the left one went on
    await inline(client, left, *cursor_in(LONG, 2600))
    assert (await status(client))["computedTokens"] <= 2  # both warm: the request reuses the left one's


async def test_warming_stops_when_the_document_closes(client: LanguageClient):
    client.workspace_did_change_configuration(
        types.DidChangeConfigurationParams(settings={"hirope": {"promptBudget": 6144}}))
    uri = (client.workspace_root / "long.py").as_uri()
    open_doc(client, uri, LONG)
    warm(client, uri, *cursor_in(LONG, 2600))
    await until_warming_starts(client)
    client.text_document_did_close(types.DidCloseTextDocumentParams(types.TextDocumentIdentifier(uri=uri)))
    stopped = await until_idle(client, timeout=5)
    await asyncio.sleep(0.3)
    later = await status(client)
    assert later["warmedTokens"] == stopped["warmedTokens"] < 6000
    assert later["cacheBytes"] == 0  # the closed document's KV state is gone


async def test_warming_stops_at_the_kv_budget_and_requests_are_still_answered(client: LanguageClient):
    client.workspace_did_change_configuration(
        types.DidChangeConfigurationParams(settings={"hirope": {"cacheBudgetMb": 1}}))  # ~80 tokens of KV state
    await wait_ready(client)
    text, line, character = mid_statement()
    uri = (client.workspace_root / "long.py").as_uri()
    open_doc(client, uri, text)
    warm(client, uri, line, character)
    stopped = await until_idle(client, timeout=60)
    assert 0 < stopped["warmedTokens"] < 256 and stopped["cacheBytes"] <= 2**20  # of a ~2,000-token prompt
    await asyncio.sleep(0.5)
    assert (await status(client))["warmedTokens"] == stopped["warmedTokens"], "nothing warms past the budget"
    await inline(client, uri, line, character)  # answered (an error would raise), the budget kept
    assert (await status(client))["cacheBytes"] <= 2**20


async def test_the_suggestion_after_an_accept_is_ready_before_it_is_asked_for(client: LanguageClient):
    # suggestions cut after a few tokens end mid-statement: there is more to say after accepting one
    client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings={"hirope": {"maxNewTokens": 3}}))
    uri = (client.workspace_root / "long.py").as_uri()
    text, line, character = mid_statement()
    open_doc(client, uri, text)
    first = await inline(client, uri, line, character)
    assert first.items, "the model suggested nothing here; pick another line"
    text = first.items[0].insert_text
    before = await until_idle(client)
    type_text(client, uri, 2, line, character, text)  # accepted as VS Code inserts it
    line, character = line + text.count("\n"), (len(text.rsplit("\n", 1)[-1]) if "\n" in text else character + len(text))
    await inline(client, uri, line, character)
    after = await status(client)
    assert after["prefetchedAnswers"] == 1
    assert after["computedTokens"] == before["computedTokens"]  # answered without the model


async def test_typing_on_leaves_the_worker_to_the_keystrokes_and_prefetches_after_the_pause(client: LanguageClient):
    client.workspace_did_change_configuration(types.DidChangeConfigurationParams(settings={"hirope": {"typeAlong": False}}))
    uri = (client.workspace_root / "long.py").as_uri()
    text, line, character = mid_statement()
    open_doc(client, uri, text)
    await inline(client, uri, line, character)
    before = await status(client)
    said = []
    for k, key in enumerate("parse_arg"):  # keys as fast as the answers come: no pause to read a suggestion
        line, character = type_text(client, uri, 2 + k, line, character, key)
        said.append(bool((await inline(client, uri, line, character)).items))
    typing = await status(client)
    assert any(said), "the model suggested nothing while typing here; pick another line"
    assert typing["warmedTokens"] == before["warmedTokens"], "work ahead ran between the keystrokes"
    assert typing["suggestedAhead"] == before["suggestedAhead"]
    done = await until_idle(client)  # the pause: only the last answer's accept is prefetched
    assert done["suggestedAhead"] == before["suggestedAhead"] + said[-1]


async def test_asked_again_in_the_same_state_the_answer_comes_without_the_model(client: LanguageClient):
    uri = (client.workspace_root / "long.py").as_uri()
    text, line, character = mid_statement()
    open_doc(client, uri, text)
    first = await inline(client, uri, line, character)
    answered = await until_idle(client)  # the suggestion after its accept is prefetched meanwhile
    again = await inline(client, uri, line, character)
    after = await status(client)
    assert after["prefetchedAnswers"] == 1 and after["computedTokens"] == answered["computedTokens"]
    assert [i.insert_text for i in again.items] == [i.insert_text for i in first.items]
    assert (await until_idle(client))["suggestedAhead"] == answered["suggestedAhead"], "nothing new to prefetch"


@pytest_lsp.fixture(config=ClientServerConfig(server_command=SERVER))
async def slow_client(lsp_client: LanguageClient, workspace):
    # a latency target no full prompt meets here: the machine is "too slow" for this budget
    await start(lsp_client, workspace, promptBudget=8192, latencyTargetMs=50)
    yield
    await lsp_client.shutdown_session()


async def test_a_cold_request_gets_a_short_prompt_and_the_full_one_warms(slow_client: LanguageClient):
    client = slow_client
    uri = (client.workspace_root / "long.py").as_uri()
    open_doc(client, uri, LONG)
    line, character = cursor_in(LONG, 2000)
    await inline(client, uri, line, character)
    answered = await status(client)
    assert answered["fastAnswers"] == 1
    assert 0 < answered["computedTokens"] < 2048
    for _ in range(2400):  # the full prompt warms once the user pauses after the answer
        warmed = await status(client)
        if warmed["warmedTokens"] > 4096:
            break
        await asyncio.sleep(0.05)
    assert warmed["warmedTokens"] > 4096


async def test_warming_on_a_slow_machine_suggests_from_the_short_prompt_then_from_the_full_one(
        slow_client: LanguageClient):
    client = slow_client
    uri = (client.workspace_root / "long.py").as_uri()
    text, line, character = mid_statement(2000)
    open_doc(client, uri, text)
    warm(client, uri, line, character)
    done = await until_idle(client)
    assert done["suggestedAhead"] == 2 and done["warmedTokens"] > 4096 and done["computedTokens"] == 0
    await inline(client, uri, line, character)
    after = await status(client)
    assert after["prefetchedAnswers"] == 1 and after["computedTokens"] == 0
