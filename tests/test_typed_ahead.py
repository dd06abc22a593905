from hirope_lsp.completion.typed_ahead import ShownSuggestions
from hirope_lsp.hierarchy.document import Change, Document

TEXT = "def f(x):\n    return \n\nprint('é')\n"


def shown_at(text=TEXT, suggestion="x * 2  # 😀 done"):
    doc = Document("file:///w/a.py", text, language_id="python")
    shown = ShownSuggestions()
    cursor = doc.offset_at(1, 11)[1]
    shown.remember(doc, cursor, suggestion)
    return doc, shown


def type_at(doc: Document, line: int, character: int, text: str) -> int:
    doc.apply_changes([Change(text, ((line, character), (line, character)))])
    return doc.offset_at(line, character + len(text.encode("utf-16-le")) // 2)[1]


def test_typing_the_start_of_a_suggestion_leaves_its_rest():
    doc, shown = shown_at()
    assert shown.rest(doc, doc.offset_at(1, 11)[1]) is None, "nothing typed: the model answers"
    cursor = type_at(doc, 1, 11, "x ")
    assert shown.rest(doc, cursor) == "* 2  # 😀 done"
    cursor = type_at(doc, 1, 13, "* 2  # 😀")  # the emoji is two UTF-16 units, four bytes
    assert shown.rest(doc, cursor) == " done"
    cursor = type_at(doc, 1, 22, " done")
    assert shown.rest(doc, cursor) is None, "all of it typed: nothing left to suggest"


def test_anything_else_falls_back_to_the_model():
    doc, shown = shown_at()
    cursor = type_at(doc, 1, 11, "y")  # not the suggestion's start
    assert shown.rest(doc, cursor) is None
    doc, shown = shown_at()
    cursor = type_at(doc, 1, 11, "x ")
    doc.apply_changes([Change("Z", ((3, 7), (3, 8)))])  # same length, elsewhere (the é)
    assert shown.rest(doc, cursor) is None
    doc, shown = shown_at()
    type_at(doc, 0, 0, "x ")  # the suggestion's start typed, but not at the cursor
    assert shown.rest(doc, doc.offset_at(1, 13)[1]) is None
    doc, shown = shown_at()
    cursor = type_at(doc, 1, 11, "x ")
    shown.forget(doc.uri)
    assert shown.rest(doc, cursor) is None


def test_an_empty_suggestion_is_not_remembered():
    doc, shown = shown_at(suggestion="")
    assert shown.rest(doc, type_at(doc, 1, 11, "x")) is None


def test_suggestions_made_ahead_for_several_states_of_a_document_each_answer():
    ahead = ShownSuggestions(answers_at_start=True, keep=2)
    doc = Document("file:///w/a.py", TEXT, language_id="python")
    at_return, at_end = doc.offset_at(1, 11)[1], len(doc.source)
    ahead.remember(doc, at_return, "x")
    ahead.remember(doc, at_end, "main()")
    assert ahead.covers(doc, at_return) and ahead.covers(doc, at_end)
    assert not ahead.covers(doc, 0)
    ahead.remember(doc, at_return, "x + 1")  # the same state again (the full prompt's): it replaces the short one's
    assert ahead.rest(doc, at_return) == "x + 1"
    ahead.remember(doc, 0, "import os\n")  # a third state: the oldest goes
    assert ahead.covers(doc, 0) and ahead.covers(doc, at_return) and not ahead.covers(doc, at_end)
    assert ahead.covers(doc, at_return), "covers changes nothing"


def test_nothing_to_say_is_kept_ahead_for_exactly_its_state():
    ahead = ShownSuggestions(answers_at_start=True, keep=2)
    doc = Document("file:///w/a.py", TEXT, language_id="python")
    at = doc.offset_at(1, 11)[1]
    ahead.remember(doc, at, "", short=True)
    assert ahead.answer(doc, at) == ("", True)
    assert ahead.covers(doc, at) and not ahead.covers(doc, at, full_only=True)
    assert ahead.rest(doc, at + 1) is None
    cursor = type_at(doc, 1, 11, "x")
    assert ahead.rest(doc, cursor) is None and ahead.rest(doc, at) is None, "another text: the model answers"


def test_with_typing_along_off_a_suggestion_kept_ahead_answers_only_its_own_state():
    ahead = ShownSuggestions(answers_at_start=True)
    doc = Document("file:///w/a.py", TEXT, language_id="python")
    at = doc.offset_at(1, 11)[1]
    ahead.remember(doc, at, "x * 2")
    assert ahead.answer(doc, at, typed_along=False) == ("x * 2", False)
    cursor = type_at(doc, 1, 11, "x")
    assert ahead.answer(doc, cursor, typed_along=False) is None, "the model answers every keystroke"
    assert ahead.answer(doc, cursor) == (" * 2", False)
