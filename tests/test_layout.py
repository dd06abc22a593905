"""The rooms of the package: the server never imports the research tools (evaluation, benchmarks,
training), and the lower floors never import the server or the session."""

import subprocess
import sys


def imported_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print('\\n'.join(m for m in sys.modules if m.startswith('hirope_lsp')))"
    return set(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split())


def test_the_server_does_not_import_the_research_tools():
    modules = imported_after("import hirope_lsp.server, hirope_lsp.session")
    assert "hirope_lsp.session" in modules
    assert not {m for m in modules if m.startswith("hirope_lsp.research")}


def test_the_model_and_completion_floors_do_not_import_the_top():
    modules = imported_after("import hirope_lsp.completion.service, hirope_lsp.model.engine")
    assert not modules & {"hirope_lsp.server", "hirope_lsp.session", "hirope_lsp.config", "hirope_lsp.cli"}
