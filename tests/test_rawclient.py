from hirope_lsp.research.rawclient import first_suggestion


def test_first_suggestion_reads_every_result_shape_lsp_allows():
    item = {"insertText": "x = 1", "range": None}
    assert first_suggestion({"result": {"items": [item, {"insertText": "y"}]}}) == "x = 1"
    assert first_suggestion({"result": [item]}) == "x = 1"
    for empty in ({"result": None}, {"result": {"items": []}}, {"result": []}, {"error": {"code": -32603}}):
        assert first_suggestion(empty) == ""
