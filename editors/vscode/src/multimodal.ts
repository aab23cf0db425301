// Image and voice commands: pick a file (or use the link under the cursor), record an
// instruction with sox / arecord / ffmpeg when one is installed, and show the answer as it
// streams ($/progress). The server reads the files; nothing here knows about models.
import { spawn, spawnSync } from "child_process";
import * as fs from "fs";
import * as path from "path";
import * as vscode from "vscode";

type Run = (command: string, args?: unknown[]) => Promise<unknown>;
type OnProgress = (listener: (message: string) => void) => vscode.Disposable | undefined;

const IMAGES = { Images: ["png", "jpg", "jpeg", "webp", "gif"] };
const MAX_SECONDS = 30;

function here(): { uri: string; position: object; range: object } | undefined {
  const editor = vscode.window.activeTextEditor;
  if (!editor) {
    return undefined;
  }
  const s = editor.selection;
  return {
    uri: editor.document.uri.toString(),
    position: { line: s.active.line, character: s.active.character },
    range: {
      start: { line: s.start.line, character: s.start.character },
      end: { line: s.end.line, character: s.end.character },
    },
  };
}

async function pick(filters: Record<string, string[]>, title: string): Promise<string | undefined> {
  const folder = vscode.workspace.workspaceFolders?.[0]?.uri;
  const files = await vscode.window.showOpenDialog({ canSelectMany: false, filters, title, defaultUri: folder });
  return files?.[0]?.toString();
}

// the first recorder found on PATH, as the command that records `out` (16 kHz mono WAV)
function recorder(out: string): [string, string[]] | undefined {
  const has = (bin: string) => spawnSync(process.platform === "win32" ? "where" : "which", [bin]).status === 0;
  const t = String(MAX_SECONDS);
  if (has("rec")) {
    return ["rec", ["-q", "-c", "1", "-r", "16000", "-b", "16", out, "trim", "0", t]];
  }
  if (has("arecord")) {
    return ["arecord", ["-q", "-f", "S16_LE", "-c", "1", "-r", "16000", "-d", t, out]];
  }
  if (has("ffmpeg")) {
    const input = process.platform === "darwin" ? ["-f", "avfoundation", "-i", ":0"] : ["-f", "pulse", "-i", "default"];
    return ["ffmpeg", ["-loglevel", "error", "-y", ...input, "-ac", "1", "-ar", "16000", "-t", t, out]];
  }
  return undefined;
}

// records into the workspace (the server reads only files inside workspace folders)
async function record(): Promise<string | undefined> {
  const folder = vscode.workspace.workspaceFolders?.[0]?.uri.fsPath;
  if (!folder) {
    vscode.window.showWarningMessage("Gemma: open a folder first (recordings are saved in it)");
    return undefined;
  }
  const out = path.join(folder, ".gemma-lsp", "instruction.wav");
  fs.mkdirSync(path.dirname(out), { recursive: true });
  const cmd = recorder(out);
  if (!cmd) {
    vscode.window.showErrorMessage(
      "Gemma: no recorder found: install sox (`rec`), alsa-utils (`arecord`) or ffmpeg, or pick a WAV file");
    return undefined;
  }
  const proc = spawn(cmd[0], cmd[1], { stdio: "ignore" });
  const ended = new Promise<number | null>((resolve) => {
    proc.on("exit", (code) => resolve(code));
    proc.on("error", () => resolve(-1));
  });
  await vscode.window.withProgress(
    { location: vscode.ProgressLocation.Notification, title: `Gemma: recording (${cmd[0]}, up to ${MAX_SECONDS} s): cancel to stop`, cancellable: true },
    async (_progress, token) => {
      token.onCancellationRequested(() => proc.kill("SIGINT")); // the recorders finish the WAV on SIGINT
      await ended;
    },
  );
  const code = await ended;
  if (!fs.existsSync(out) || (code !== 0 && code !== null && code !== 130)) {
    vscode.window.showErrorMessage(`Gemma: ${cmd[0]} could not record (exit ${code})`);
    return undefined;
  }
  return vscode.Uri.file(out).toString();
}

// a markdown preview filled with the text so far, then the answer
async function streamed(onProgress: OnProgress, work: () => Promise<unknown>): Promise<void> {
  const doc = await vscode.workspace.openTextDocument({ language: "markdown", content: "…" });
  await vscode.window.showTextDocument(doc, { viewColumn: vscode.ViewColumn.Beside, preview: true });
  const show = async (text: string) => {
    const edit = new vscode.WorkspaceEdit();
    edit.replace(doc.uri, new vscode.Range(0, 0, doc.lineCount, 0), text);
    await vscode.workspace.applyEdit(edit);
  };
  const sub = onProgress((message) => void show(message));
  try {
    const result = await work();
    const text = typeof result === "string" ? result : (result as { answer?: string } | undefined)?.answer;
    if (text) {
      await show(text);
    }
  } finally {
    sub?.dispose();
  }
}

export function registerMultimodal(run: Run, onProgress: OnProgress): vscode.Disposable[] {
  const voice = async (wav: string | undefined) => {
    const at = here();
    if (wav && at) {
      await streamed(onProgress, () => run("gemma.voiceInstruction", [wav, at.uri, at.range]));
    } else if (!at) {
      vscode.window.showWarningMessage("Gemma: select the code the instruction is about first");
    }
  };
  return [
    vscode.commands.registerCommand("gemma.explainImageFile", async () => {
      const image = await pick(IMAGES, "Image to explain");
      const at = here();
      if (image) {
        await streamed(onProgress, () => run("gemma.explainImage", at ? [image, at.uri, at.position] : [image]));
      }
    }),
    vscode.commands.registerCommand("gemma.explainImageAtCursor", async () => {
      const at = here();
      if (at) {
        await streamed(onProgress, () => run("gemma.explainImage", [null, at.uri, at.position]));
      }
    }),
    vscode.commands.registerCommand("gemma.codeFromImageFile", async () => {
      const at = here();
      const image = at && (await pick(IMAGES, "Mock-up or diagram to implement"));
      if (at && image) {
        await run("gemma.codeFromImage", [image, at.uri, at.position]);
      }
    }),
    vscode.commands.registerCommand("gemma.voiceInstructionFile", async () =>
      voice(await pick({ "WAV recordings": ["wav"] }, "Spoken instruction (WAV)"))),
    vscode.commands.registerCommand("gemma.recordInstruction", async () => voice(await record())),
  ];
}
