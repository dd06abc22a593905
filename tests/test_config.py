from hirope_lsp.config import Settings, apply_options


def test_client_options_are_applied_and_bad_ones_reported_keeping_the_default():
    settings, problems = apply_options(Settings(), {
        "promptBudget": 2048, "typeAlong": False, "hirope": {"window": 64, "method": "yarn"},
        "maxNewTokens": True, "multiline": "sometimes", "colour": "blue"})
    assert settings.context.budget_tokens == 2048
    assert settings.type_along is False
    assert (settings.engine.rope.window, settings.engine.rope.method) == (64, "yarn")
    assert settings.max_new_tokens == Settings().max_new_tokens and settings.multiline == "auto"
    assert len(problems) == 3
    assert any("maxNewTokens" in p and "number" in p for p in problems)
    assert any("multiline" in p for p in problems) and any("colour" in p for p in problems)


def test_hirope_false_means_plain_rope_and_the_input_is_not_modified():
    base = Settings()
    settings, problems = apply_options(base, {"hirope": False})
    assert settings.engine.rope.method == "rope" and not problems
    assert base.engine.rope.method == "hirope"
    assert apply_options(base, "nonsense")[1] == ["settings must be an object, got str"]
