// gemma-lsp for VS Code: starts the server, passes settings, adds commands, a status bar item,
// and shows explanations as they stream in ($/progress). No model or prompt logic lives here.
import * as vscode from "vscode";
import {
  LanguageClient,
  LanguageClientOptions,
  ServerOptions,
  TransportKind,
} from "vscode-languageclient/node";
import { NextEdits } from "./nextEdit";
import { registerMultimodal } from "./multimodal";

let client: LanguageClient | undefined;
let status: vscode.StatusBarItem;

let settingKeys: string[] = []; // the contributed gemma.* settings (package.json), once

// Every contributed gemma.* setting but serverCommand, nested by its dots, under "gemma": the
// server reads this shape from initializationOptions and didChangeConfiguration alike.
function settings(): Record<string, unknown> {
  const c = vscode.workspace.getConfiguration("gemma");
  const gemma: Record<string, unknown> = {};
  for (const key of settingKeys) {
    const path = key.split(".");
    let node = gemma;
    for (const part of path.slice(0, -1)) {
      node = (node[part] ??= {}) as Record<string, unknown>;
    }
    node[path[path.length - 1]] = c.get(key);
  }
  return { gemma };
}

function selectionArgs(): [string, object] | undefined {
  const editor = vscode.window.activeTextEditor;
  if (!editor) {
    vscode.window.showWarningMessage("Gemma: open a file and select some code first");
    return undefined;
  }
  const s = editor.selection;
  const range = {
    start: { line: s.start.line, character: s.start.character },
    end: { line: s.end.line, character: s.end.character },
  };
  return [editor.document.uri.toString(), range];
}

let tokens = 0;

// `wait`: pass a workDoneToken, so that the server answers with the result once it is done
// (and reports progress on that token); otherwise long work answers at once and its result
// (an edit) arrives as workspace/applyEdit
async function run(command: string, extra: unknown[] = [], wait = false): Promise<unknown> {
  if (!client) {
    return undefined;
  }
  const workDoneToken = wait ? `gemma-vscode-${++tokens}` : undefined;
  return client.sendRequest("workspace/executeCommand", { command, arguments: extra, workDoneToken });
}

async function explain(): Promise<void> {
  const args = selectionArgs();
  if (!args) {
    return;
  }
  // a markdown preview that fills in as the server reports the text so far
  const doc = await vscode.workspace.openTextDocument({ language: "markdown", content: "…" });
  await vscode.window.showTextDocument(doc, { viewColumn: vscode.ViewColumn.Beside, preview: true });
  const show = async (text: string) => {
    const edit = new vscode.WorkspaceEdit();
    edit.replace(doc.uri, new vscode.Range(0, 0, doc.lineCount, 0), text);
    await vscode.workspace.applyEdit(edit);
  };
  const sub = client?.onNotification("$/progress", (p: { value?: { kind?: string; message?: string } }) => {
    if (p.value?.kind === "report" && p.value.message) {
      void show(p.value.message);
    }
  });
  try {
    const result = await run("gemma.explain", args, true);
    if (typeof result === "string") {
      await show(result);
    }
  } finally {
    sub?.dispose();
  }
}

async function refreshStatus(): Promise<void> {
  try {
    const info = (await run("gemma.status")) as
      | { state?: string; decode_tok_s?: number; model?: string }
      | undefined;
    if (info?.state === "running") {
      status.text = info.decode_tok_s
        ? `$(sparkle) Gemma ${info.decode_tok_s} tok/s`
        : "$(sparkle) Gemma ready"; // no speed measured yet
      status.tooltip = `gemma-lsp engine: ${info.model ?? ""}`;
    } else {
      status.text = "$(warning) Gemma";
      status.tooltip = "gemma-lsp engine is not running";
    }
  } catch {
    status.text = "$(warning) Gemma";
  }
}

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  const props = context.extension.packageJSON?.contributes?.configuration?.properties ?? {};
  settingKeys = Object.keys(props)
    .filter((k) => k.startsWith("gemma.") && k !== "gemma.serverCommand")
    .map((k) => k.slice("gemma.".length));
  const cmd = vscode.workspace.getConfiguration("gemma").get<string[]>("serverCommand") ?? ["gemma-lsp"];
  const serverOptions: ServerOptions = {
    command: cmd[0],
    args: cmd.slice(1),
    transport: TransportKind.stdio,
  };
  const clientOptions: LanguageClientOptions = {
    documentSelector: [{ scheme: "file" }, { scheme: "untitled" }],
    initializationOptions: settings(),
  };
  client = new LanguageClient("gemma-lsp", "Gemma LSP", serverOptions, clientOptions);
  status = vscode.window.createStatusBarItem(vscode.StatusBarAlignment.Right, 100);
  status.command = "gemma.showStatus";
  status.text = "$(sync~spin) Gemma";
  status.show();
  context.subscriptions.push(
    status,
    vscode.commands.registerCommand("gemma.explainSelection", explain),
    vscode.commands.registerCommand("gemma.refactorSelection", async () => {
      const args = selectionArgs();
      const instruction = await vscode.window.showInputBox({
        prompt: "How should Gemma refactor the selection?",
        placeHolder: "e.g. use a guard clause",
      });
      if (args && instruction !== undefined) {
        await run("gemma.refactor", [...args, instruction]);
      }
    }),
    vscode.commands.registerCommand("gemma.addDocstring", async () => {
      const args = selectionArgs();
      if (args) {
        await run("gemma.docstring", args);
      }
    }),
    vscode.commands.registerCommand("gemma.cancelAll", () => run("gemma.cancel")),
    vscode.commands.registerCommand("gemma.restart", async () => {
      await run("gemma.restartEngine");
      await refreshStatus();
    }),
    vscode.commands.registerCommand("gemma.showStatus", async () => {
      const info = await run("gemma.status");
      await refreshStatus();
      const doc = await vscode.workspace.openTextDocument({
        language: "json",
        content: JSON.stringify(info, null, 2),
      });
      await vscode.window.showTextDocument(doc, { preview: true });
    }),
    ...registerMultimodal(run, (listener) =>
      client?.onNotification("$/progress", (p: { value?: { kind?: string; message?: string } }) => {
        if (p.value?.kind === "report" && p.value.message) {
          listener(p.value.message);
        }
      })),
    vscode.workspace.onDidChangeConfiguration((e) => {
      if (e.affectsConfiguration("gemma") && client) {
        void client.sendNotification("workspace/didChangeConfiguration", { settings: settings() });
      }
    }),
  );
  await client.start();
  context.subscriptions.push(new NextEdits(client));
  await refreshStatus();
  const timer = setInterval(() => void refreshStatus(), 15000);
  context.subscriptions.push({ dispose: () => clearInterval(timer) });
}

export async function deactivate(): Promise<void> {
  await client?.stop();
}
