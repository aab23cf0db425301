"""Command line: argv -> the language server (default) or a subcommand. Engine modules (numpy)
load lazily, only in the subcommands that run the model in this process."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.protocol import QUANT_CHOICES


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="GGUF file (default: the embedded Gemma 3 270M)")
    p.add_argument("--threads", type=int, help="BLAS threads (default: all cores)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemma-lsp", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    parser.add_argument("--log-file", metavar="PATH",
                        help="append the log to PATH instead of stderr (with -v: every request)")
    parser.add_argument("--tcp", metavar="HOST:PORT", help="serve LSP over TCP instead of stdio")
    # what language clients pass by convention (vscode-languageclient: --stdio)
    parser.add_argument("--stdio", action="store_true", help="serve LSP on stdio (the default)")
    parser.add_argument("--clientProcessId", help=argparse.SUPPRESS)
    parser.add_argument("--max-frame-mb", type=float, default=64.0, metavar="MB",
                        help="largest LSP message accepted; a larger one is skipped (default 64)")
    parser.add_argument("--debug-commands", action="store_true",
                        help="add the gemma.debug.document command (the server's copy of a "
                        "document; for tests)")
    sub = parser.add_subparsers(dest="command")

    g = sub.add_parser("generate", help="complete a prompt with the local model")
    g.add_argument("prompt", nargs="?", help="prompt text (default: read stdin)")
    g.add_argument("--file", type=Path, help="read the prompt from this file")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--json", action="store_true", help="print one JSON object at the end")
    _add_model_args(g)

    t = sub.add_parser("tokenize", help="print the token ids of stdin as JSON (BOS included)")
    _add_model_args(t)

    e = sub.add_parser("engine", help="run the resident engine in the foreground")
    e.add_argument("--socket", type=Path, help="socket path (default: in the runtime dir)")
    e.add_argument("--idle-timeout", type=float, default=1800.0,
                   help="exit after this many seconds without clients (0 = never)")
    e.add_argument("--quant", choices=QUANT_CHOICES,
                   help="the weight type a Hugging Face checkpoint is quantized to once "
                   "(default: q8_0 below 8B parameters, q4_0 above; a GGUF keeps its own)")
    e.add_argument("--draft-model", help="a Gemma 4 assistant (MTP) checkpoint directory or "
                   "cached repo id to draft with (default: prompt lookup)")
    e.add_argument("--no-speculate", action="store_true",
                   help="never draft: decode one token per step")
    e.add_argument("--no-kernels", action="store_true",
                   help="no packed matmul kernels: numpy does every product (saves memory the "
                   "size of the weights; verifying drafts and scoring next edits get slower)")
    e.add_argument("--cache-mb", type=int, default=512, help="prompt cache budget in MB")
    e.add_argument("--no-persist", action="store_true", help="do not load/save the cache")
    e.add_argument("--cache-file", type=Path, help="where the prompt cache is saved")
    e.add_argument("--client-buffer-kb", type=int, default=256,
                   help="replies queued for a client that is not reading before its work "
                   "pauses (default 256)")
    e.add_argument("--client-stall-s", type=float, default=30.0,
                   help="drop a paused client that reads nothing for this long (default 30)")
    e.add_argument("--http", metavar="HOST:PORT",
                   help="also serve an OpenAI-compatible API (/v1/models, /v1/completions, "
                   "/v1/chat/completions) from this engine, e.g. 127.0.0.1:8088")
    e.add_argument("--http-token-file", metavar="PATH",
                   help="require the bearer token in this file (mode 0600; default: "
                   "$GEMMA_LSP_HTTP_TOKEN; none)")
    # refused with an explanation: every local user can read a process's arguments
    e.add_argument("--http-token", help=argparse.SUPPRESS)
    e.add_argument("--http-allow-remote", action="store_true",
                   help="allow a non-loopback --http address")
    _add_model_args(e)

    s = sub.add_parser("status", help="show the running engine's model, cache and speed")
    s.add_argument("--socket", type=Path)

    p = sub.add_parser("pull", help="download a Hugging Face checkpoint into its cache")
    p.add_argument("repo_id", help="e.g. google/gemma-3-1b-it")

    d = sub.add_parser("demo", help="the real server with a scripted client: an inline "
                       "completion, a refactor as a diff, a streamed explanation")
    d.add_argument("file", nargs="?", type=Path, help="a source file (default: a sample)")
    d.add_argument("--line", type=int, help="cursor line, 1-based (default: the last)")
    d.add_argument("--col", type=int, help="cursor column, 1-based (default: line end)")
    d.add_argument("--max-tokens", type=int, default=48, help="inline completion length")
    d.add_argument("--instruction", default="use a guard clause", help="for the refactor")
    return parser


def cmd_pull(args: argparse.Namespace) -> int:
    from engine.hf import pull

    try:
        path = pull(args.repo_id, token=os.environ.get("HF_TOKEN") or None)
    except ValueError as e:
        raise CliError(str(e)) from e
    print(f"{args.repo_id}: {path}\nuse it with --model {args.repo_id} (or engine.model)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from gemma_lsp.demo import SAMPLE, DemoOptions
    from gemma_lsp.demo import main as demo

    if args.max_tokens <= 0:
        raise CliError(f"--max-tokens must be positive, got {args.max_tokens}")
    opts = DemoOptions(
        file=args.file or SAMPLE,
        line=None if args.line is None else args.line - 1,
        col=None if args.col is None else args.col - 1,
        max_tokens=args.max_tokens, instruction=args.instruction)
    try:
        return demo(opts)
    except (ValueError, UnicodeDecodeError, OSError) as e:
        raise CliError(str(e)) from e


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None and args.file is not None:
        raise CliError("give the prompt as an argument or with --file, not both")
    if args.file is not None:
        try:
            data = args.file.read_bytes()
        except OSError as e:
            raise CliError(f"cannot read {args.file}: {e.strerror}") from e
        return _utf8(data, str(args.file))
    if args.prompt is not None:
        return str(args.prompt)
    return _utf8(sys.stdin.buffer.read(), "stdin")


def _utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CliError(f"{where} is not valid UTF-8 (byte {e.start})") from e


def _load(args: argparse.Namespace) -> Any:
    from engine.runtime import Model, pin_blas_threads

    if args.threads is not None and args.threads <= 0:
        raise CliError(f"--threads must be positive, got {args.threads}")
    pin_blas_threads(args.threads)
    try:
        return Model.load(args.model)
    except ValueError as e:
        raise CliError(str(e)) from e


def cmd_tokenize(args: argparse.Namespace) -> int:
    text = _utf8(sys.stdin.buffer.read(), "stdin")
    from engine.runtime import Model

    try:
        model = Model.load(args.model)
    except ValueError as e:
        raise CliError(str(e)) from e
    print(json.dumps(model.tokenizer.encode(text, add_bos=True)))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = _read_prompt(args)
    if not prompt:
        raise CliError("empty prompt: give some text to complete")
    if args.max_tokens < 0:
        raise CliError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    from engine.generate import Final, GenerateOptions, generate
    from engine.sampling import SamplingParams

    try:
        sampling = SamplingParams(args.temperature, args.top_k, args.top_p, args.seed)
    except ValueError as e:
        raise CliError(str(e)) from e
    model = _load(args)
    ids = model.tokenizer.encode(prompt, add_bos=True)
    ctx = model.config.context_length
    if len(ids) >= ctx:
        raise CliError(f"prompt is {len(ids)} tokens; the model's context is {ctx} tokens")
    opts = GenerateOptions(
        max_tokens=args.max_tokens, sampling=sampling, stop_strings=tuple(args.stop)
    )
    final: Final | None = None
    for ev in generate(model, ids, opts):
        if isinstance(ev, Final):
            final = ev
        elif not args.json:
            sys.stdout.write(ev.text)
            sys.stdout.flush()
    assert final is not None
    if args.json:
        print(
            json.dumps(
                {
                    "token_ids": list(final.token_ids),
                    "text": final.text,
                    "prompt_tokens": final.prompt_tokens,
                    "finish_reason": final.reason,
                    "prefill_tok_s": round(final.prefill_tok_s, 2),
                    "decode_tok_s": round(final.decode_tok_s, 2),
                }
            )
        )
    else:
        sys.stdout.write(final.tail + "\n")
        print(
            f"[{final.prompt_tokens} prompt tokens at {final.prefill_tok_s:.1f} tok/s; "
            f"{len(final.token_ids)} generated at {final.decode_tok_s:.1f} tok/s; "
            f"stop: {final.reason}]",
            file=sys.stderr,
        )
    return 0


def cmd_engine(args: argparse.Namespace) -> int:
    from engine.daemon import DaemonOptions, serve

    if not args.verbose:
        logging.getLogger("gemma-lsp.engine").setLevel(logging.INFO)
    if args.http_token is not None:
        raise CliError("--http-token would show the token to every local user (in "
                       "/proc/PID/cmdline and ps); put it in a file only you can read and pass "
                       "--http-token-file PATH, or set $GEMMA_LSP_HTTP_TOKEN")
    try:
        http = None
        if args.http:
            from engine.http_api import HttpOptions, parse_bind, read_token_file

            host, port = parse_bind(args.http, args.http_allow_remote)
            token = (read_token_file(args.http_token_file) if args.http_token_file
                     else os.environ.get("GEMMA_LSP_HTTP_TOKEN") or None)
            http = HttpOptions(host, port, token, args.http_allow_remote)
        opts = DaemonOptions(
            socket=args.socket, idle_timeout_s=args.idle_timeout, cache_mb=args.cache_mb,
            model=args.model, threads=args.threads, persist=not args.no_persist,
            cache_file=args.cache_file, http=http, client_buffer_kb=args.client_buffer_kb,
            client_stall_s=args.client_stall_s, draft_model=args.draft_model,
            speculate=not args.no_speculate, kernels=not args.no_kernels,
            quant=args.quant,
        )
        return serve(opts)
    except ValueError as e:
        raise CliError(str(e)) from e


def cmd_status(args: argparse.Namespace) -> int:
    from gemma_lsp.engine_client import EngineClient, EngineError

    try:
        client = EngineClient(socket_path=args.socket, autostart=False)
        info = client.status()
        client.close()
    except EngineError as e:
        raise CliError(str(e)) from e
    print(json.dumps(info, indent=1))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from gemma_lsp.server import serve

    if not args.max_frame_mb > 0:
        raise CliError(f"--max-frame-mb must be positive, got {args.max_frame_mb}")
    try:
        return serve(args.tcp, int(args.max_frame_mb * 1024 * 1024), args.debug_commands)
    except ValueError as e:
        raise CliError(str(e)) from e


COMMANDS = {
    "generate": cmd_generate,
    "tokenize": cmd_tokenize,
    "engine": cmd_engine,
    "status": cmd_status,
    "demo": cmd_demo,
    "pull": cmd_pull,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        handler: logging.Handler = (logging.FileHandler(args.log_file) if args.log_file
                                    else logging.StreamHandler(sys.stderr))
    except OSError as e:
        print(f"gemma-lsp: error: cannot write the log file: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s gemma-lsp: %(levelname)s %(message)s" if args.log_file
        else "gemma-lsp: %(levelname)s %(message)s",
        handlers=[handler],
    )
    logging.getLogger("pygls").setLevel(logging.WARNING)  # -v is about us, not every message
    try:
        if args.command is None:
            return cmd_serve(args)
        return COMMANDS[args.command](args)
    except CliError as e:
        print(f"gemma-lsp: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
