"""Entry point: `gemma-lsp` and `python -m gemma_lsp`."""

from gemma_lsp.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
