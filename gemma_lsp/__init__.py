"""gemma-lsp: private, offline AI coding help in any editor from a local Gemma model."""

__version__ = "0.1.0"
