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


def test_far_bias_settings_are_parsed_and_bad_ones_reported():
    from hirope_lsp.model.rope import DEFAULT_FAR_BIAS

    assert Settings().engine.rope.far_bias is None  # the model's own (its card), else DEFAULT_FAR_BIAS
    settings, problems = apply_options(Settings(), {"hirope": {"farBias": 2, "farBiasMode": "log"}})
    assert (settings.engine.rope.far_bias, settings.engine.rope.far_bias_mode) == (2, "log") and not problems
    settings, problems = apply_options(Settings(), {"hirope": {"farBias": [0.5, 1, 2.5]}})
    assert settings.engine.rope.far_bias == [0.5, 1, 2.5] and not problems  # the layer count is checked at attach
    bad = {"farBias": -1}, {"farBias": True}, {"farBias": "2"}, {"farBias": [1, "x"]}, {"farBias": []}, \
        {"farBias": [1.0, -2.0]}, {"farBiasMode": "linear"}, {"farBiasMode": 1}
    for options in bad:
        settings, problems = apply_options(Settings(), {"hirope": options})
        assert len(problems) == 1 and ("farBias" in problems[0]), (options, problems)
        assert (settings.engine.rope.far_bias, settings.engine.rope.far_bias_mode) == (None, "constant")
    assert DEFAULT_FAR_BIAS == 0.0
    assert "keeping None" in apply_options(Settings(), {"hirope": {"farBias": -1}})[1][0]


def test_far_bias_flags_reach_every_command():
    from hirope_lsp import cli
    from hirope_lsp.research import evaluate
    from hirope_lsp.model.rope import FAR_BIAS_MODES, RopeMethodConfig

    assert cli.FAR_BIAS_MODES == FAR_BIAS_MODES
    parser = cli.build_parser()
    args = parser.parse_args(["complete", "f.py", "--line", "0", "--character", "0", "--far-bias", "2",
                              "--far-bias-mode", "log"])
    rope = cli._settings_from(args).engine.rope
    assert (rope.far_bias, rope.far_bias_mode) == (2.0, "log")
    assert cli._settings_from(parser.parse_args(["serve", "--far-bias", "1,0,3"])).engine.rope.far_bias == [1.0, 0.0, 3.0]
    assert cli._settings_from(parser.parse_args(["serve"])).engine.rope == RopeMethodConfig()
    for argv in (["eval", "perplexity"], ["eval", "completion"], ["bench", "attention"], ["bench", "typing"],
                 ["bench", "soak"]):
        args = parser.parse_args(argv + ["--far-bias", "1.5", "--far-bias-mode", "constant"])
        assert cli._far_bias_options(args) == {"far_bias": 1.5, "far_bias_mode": "constant"}, argv
        assert cli._far_bias_options(parser.parse_args(argv)) == {}
    base = RopeMethodConfig(far_bias=1.5, far_bias_mode="log")
    for method in ("hirope", "rerope", "truncate"):
        cfg = evaluate.method_config(method, 64, 256, base)
        assert (cfg.far_bias, cfg.far_bias_mode) == (1.5, "log")
    assert cli.main(["eval", "perplexity", "--far-bias", "-1"]) == 2  # refused before any model loads


def test_bad_far_bias_flag_is_a_usage_error(capsys):
    import pytest

    from hirope_lsp import cli

    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--far-bias", "big"])
    assert "comma-separated list of numbers" in capsys.readouterr().err


def _vscode_section(overrides: dict) -> dict:
    """The "hirope" section as VS Code sends it on a change: every contributed setting with its
    default (or the user's value), nested at the dots."""
    import json
    from pathlib import Path

    package = json.loads((Path(__file__).parents[1] / "editors/vscode/package.json").read_text())
    section: dict = {}
    for key, spec in package["contributes"]["configuration"]["properties"].items():
        *parents, leaf = key.removeprefix("hirope.").split(".")
        node = section
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = overrides.get(key, spec.get("default"))
    return section


def test_the_whole_vscode_section_applies_without_warnings():
    from hirope_lsp.config import Settings, apply_options

    section = _vscode_section({"hirope.positions.window": 96, "hirope.positions.farBias": 2.5,
                               "hirope.maxNewTokens": 20, "hirope.pythonPath": "/opt/venv/bin/python"})
    assert "positions" in section and "trace" in section and "pythonPath" in section
    settings, problems = apply_options(Settings(), section)
    assert problems == []
    assert settings.engine.rope.window == 96 and settings.engine.rope.far_bias == 2.5
    assert settings.max_new_tokens == 20
    defaults, problems = apply_options(Settings(), _vscode_section({}))
    assert problems == [] and defaults == Settings(), "the contributed defaults are the server's"


def test_min_confidence_setting():
    from hirope_lsp.config import Settings, apply_options

    settings, problems = apply_options(Settings(), {"minConfidence": -1.5})
    assert problems == [] and settings.min_confidence == -1.5
    settings, problems = apply_options(settings, {"minConfidence": 0.5})
    assert settings.min_confidence == -1.5 and "0 or below" in problems[0]
    settings, problems = apply_options(settings, {"minConfidence": True})
    assert settings.min_confidence == -1.5 and "expected a number" in problems[0]


def test_warm_ahead_and_latency_target_settings():
    from hirope_lsp.config import Settings, apply_options

    assert (Settings().warm_ahead, Settings().latency_target_ms) == (True, 400)
    settings, problems = apply_options(Settings(), {"warmAhead": False, "latencyTargetMs": 1500})
    assert problems == [] and (settings.warm_ahead, settings.latency_target_ms) == (False, 1500)
    for edge in (50, 10000):
        assert apply_options(Settings(), {"latencyTargetMs": edge}) == (Settings(latency_target_ms=edge), [])
    for bad in (49, 10001, 0, -400, True, 400.5, "400"):
        settings, problems = apply_options(Settings(), {"latencyTargetMs": bad})
        assert settings.latency_target_ms == 400 and len(problems) == 1 and "latencyTargetMs" in problems[0], bad
    assert "between 50 and 10000; keeping 400" in apply_options(Settings(), {"latencyTargetMs": 20})[1][0]
    for bad in (1, "yes"):
        settings, problems = apply_options(Settings(), {"warmAhead": bad})
        assert settings.warm_ahead is True and "wrong type" in problems[0]
    settings, problems = apply_options(Settings(), {"warmAhead": None, "latencyTargetMs": None})
    assert problems == [] and settings == Settings(), "null keeps the default"


def test_a_boolean_is_not_a_number_where_null_is_allowed_either():
    from hirope_lsp.config import Settings, apply_options

    for key in ("window", "split", "factor", "trainLength"):
        settings, problems = apply_options(Settings(), {"hirope": {key: True}})
        assert settings == Settings() and len(problems) == 1 and "expected a number" in problems[0], key
    settings, problems = apply_options(Settings(), {"hirope": {"window": None, "split": None}})
    assert problems == [] and settings.engine.rope.window is None  # null is a value here: "from the model"


def test_range_checks_name_the_setting_and_keep_the_old_value():
    from hirope_lsp.config import Settings, apply_options

    cases = {"maxNewTokens": (0, "maxNewTokens must be between 1 and 4096; keeping 64"),
             "promptBudget": (31, "promptBudget must be at least 32; keeping 4096"),
             "cacheBudgetMb": (-1, "cacheBudgetMb must be at least 0; keeping 1024"),
             "maxFileBytes": (0, "maxFileBytes must be at least 1; keeping 1048576"),
             "multiline": ("sometimes", "multiline must be one of auto, always, never; keeping 'auto'")}
    for key, (value, message) in cases.items():
        settings, problems = apply_options(Settings(), {key: value})
        assert settings == Settings() and problems == [f"setting {key!r}: {message}"], key
