"""hirope-lsp: inline code completion from a local model with HiRoPE hierarchical positions."""

__version__ = "0.1.0"
