// Next-edit suggestions in VS Code: after an edit and a pause, ask the server
// (textDocument/copilotInlineEdit) for the next edit and show it as decorations: the text it
// removes struck through, the text it adds right after it. Tab jumps to it, then accepts it;
// Escape dismisses it. The server decides everything; this only draws and applies.
import * as vscode from "vscode";
import { LanguageClient } from "vscode-languageclient/node";

interface LspPosition { line: number; character: number }
interface LspRange { start: LspPosition; end: LspPosition }
interface InlineEdit {
  text: string;
  range: LspRange;
  textDocument: { uri: string; version: number };
  command?: { command: string; arguments?: unknown[] };
  parts?: { range: LspRange; newText: string }[];
}

const VISIBLE = "gemma.nextEditVisible";
const toRange = (r: LspRange) =>
  new vscode.Range(r.start.line, r.start.character, r.end.line, r.end.character);

export class NextEdits implements vscode.Disposable {
  private removed = vscode.window.createTextEditorDecorationType({
    textDecoration: "line-through",
    backgroundColor: new vscode.ThemeColor("diffEditor.removedTextBackground"),
  });
  private added = vscode.window.createTextEditorDecorationType({});
  private edit: InlineEdit | undefined;
  private editor: vscode.TextEditor | undefined;
  private timer: ReturnType<typeof setTimeout> | undefined;
  private seq = 0;
  private subs: vscode.Disposable[] = [];

  constructor(private client: LanguageClient, private delayMs = 300) {
    this.subs.push(
      vscode.workspace.onDidChangeTextDocument((e) => {
        const editor = vscode.window.activeTextEditor;
        if (editor && e.document === editor.document && e.contentChanges.length) {
          this.schedule(editor);
        }
      }),
      vscode.window.onDidChangeActiveTextEditor(() => this.clear()),
      vscode.commands.registerCommand("gemma.nextEdit.acceptOrJump", () => this.acceptOrJump()),
      vscode.commands.registerCommand("gemma.nextEdit.dismiss", () => this.dismiss()),
    );
  }

  private enabled(): boolean {
    return vscode.workspace.getConfiguration("gemma").get<boolean>("nextEdit.enabled") ?? true;
  }

  private schedule(editor: vscode.TextEditor): void {
    this.clear();
    if (this.timer) {
      clearTimeout(this.timer);
    }
    if (this.enabled()) {
      this.timer = setTimeout(() => void this.request(editor), this.delayMs);
    }
  }

  private async request(editor: vscode.TextEditor): Promise<void> {
    const seq = ++this.seq;
    const doc = editor.document;
    const version = doc.version;
    const pos = editor.selection.active;
    let result: { edits?: InlineEdit[] } | undefined;
    try {
      result = await this.client.sendRequest("textDocument/copilotInlineEdit", {
        textDocument: { uri: doc.uri.toString(), version },
        position: { line: pos.line, character: pos.character },
      });
    } catch {
      return; // no suggestion is not an error worth a popup
    }
    const edit = result?.edits?.[0];
    if (!edit || seq !== this.seq || doc.version !== version) {
      return; // a newer request, or the text moved on
    }
    this.show(editor, edit);
    void this.client.sendNotification("textDocument/didShowInlineEdit", { item: edit });
  }

  private show(editor: vscode.TextEditor, edit: InlineEdit): void {
    this.edit = edit;
    this.editor = editor;
    const parts = edit.parts ?? [{ range: edit.range, newText: edit.text }];
    editor.setDecorations(this.removed, parts.map((p) => toRange(p.range)).filter((r) => !r.isEmpty));
    editor.setDecorations(this.added, parts.map((p) => ({
      range: toRange(p.range),
      renderOptions: {
        after: {
          contentText: p.newText.replace(/\n/g, "⏎"),
          color: new vscode.ThemeColor("editorGhostText.foreground"),
          backgroundColor: new vscode.ThemeColor("diffEditor.insertedTextBackground"),
        },
      },
    })));
    void vscode.commands.executeCommand("setContext", VISIBLE, true);
  }

  clear(): void {
    this.edit = undefined;
    if (this.editor) {
      this.editor.setDecorations(this.removed, []);
      this.editor.setDecorations(this.added, []);
    }
    void vscode.commands.executeCommand("setContext", VISIBLE, false);
  }

  private async acceptOrJump(): Promise<void> {
    const edit = this.edit;
    const editor = vscode.window.activeTextEditor;
    if (!edit || !editor || editor !== this.editor) {
      return;
    }
    const range = toRange(edit.range);
    if (editor.selection.active.line !== range.start.line) {
      editor.selection = new vscode.Selection(range.start, range.start);
      editor.revealRange(range, vscode.TextEditorRevealType.InCenterIfOutsideViewport);
      return;
    }
    this.clear();
    await editor.edit((b) => b.replace(range, edit.text));
    if (edit.command) {
      await this.client.sendRequest("workspace/executeCommand", {
        command: edit.command.command, arguments: edit.command.arguments ?? [],
      });
    }
  }

  private async dismiss(): Promise<void> {
    const id = this.edit?.command?.arguments?.[0];
    this.clear();
    if (id !== undefined) {
      await this.client.sendRequest("workspace/executeCommand", {
        command: "gemma.nextEdit.reject", arguments: [id],
      });
    }
  }

  dispose(): void {
    this.clear();
    this.removed.dispose();
    this.added.dispose();
    for (const s of this.subs) {
      s.dispose();
    }
  }
}
