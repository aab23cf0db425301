-- Image and voice commands for gemma-lsp: :GemmaExplainImage [path] (no path: the image link
-- under the cursor), :GemmaCodeFromImage {path}, :[range]GemmaVoice {wav} and
-- :[range]GemmaRecord [seconds] (records with sox `rec`, `arecord` or ffmpeg, then runs
-- :GemmaVoice on it). The server reads the files; paths outside the workspace are refused there.
local M = {}

local function cursor_position()
  local row, col = unpack(vim.api.nvim_win_get_cursor(0))
  return { line = row - 1, character = col }
end

local function full_path(p)
  return vim.fn.fnamemodify(vim.fn.expand(p), ":p")
end

local function recorder(out, seconds)
  local t = tostring(seconds)
  if vim.fn.executable("rec") == 1 then
    return { "rec", "-q", "-c", "1", "-r", "16000", "-b", "16", out, "trim", "0", t }
  elseif vim.fn.executable("arecord") == 1 then
    return { "arecord", "-q", "-f", "S16_LE", "-c", "1", "-r", "16000", "-d", t, out }
  elseif vim.fn.executable("ffmpeg") == 1 then
    local input = vim.fn.has("mac") == 1 and { "-f", "avfoundation", "-i", ":0" }
      or { "-f", "pulse", "-i", "default" }
    return vim.list_extend(vim.list_extend({ "ffmpeg", "-loglevel", "error", "-y" }, input),
      { "-ac", "1", "-ar", "16000", "-t", t, out })
  end
  return nil
end

-- Records `seconds` of audio into <cwd>/.gemma-lsp/instruction.wav; calls on_done(path).
function M.record(seconds, on_done)
  local out = vim.fn.getcwd() .. "/.gemma-lsp/instruction.wav"
  vim.fn.mkdir(vim.fn.fnamemodify(out, ":h"), "p")
  local cmd = recorder(out, seconds)
  if not cmd then
    vim.notify("Gemma: no recorder found: install sox (rec), alsa-utils (arecord) or ffmpeg",
      vim.log.levels.ERROR)
    return
  end
  vim.notify(("Gemma: recording %d s with %s…"):format(seconds, cmd[1]))
  vim.system(cmd, {}, function(res)
    vim.schedule(function()
      if res.code ~= 0 or vim.fn.filereadable(out) == 0 then
        vim.notify(("Gemma: %s failed (exit %d)"):format(cmd[1], res.code), vim.log.levels.ERROR)
      else
        on_done(out)
      end
    end)
  end)
end

-- h: the plugin's helpers { command = fn(name, args, on_result), show_float = fn(text),
-- range_args = fn(opts) -> uri, range }
function M.commands(h)
  local function answer(result)
    local text = type(result) == "string" and result or (type(result) == "table" and result.answer)
    if text and text ~= "" then
      h.show_float(text)
    end
  end
  local function voice(wav, opts)
    local uri, range = h.range_args(opts)
    h.show_float("…")
    h.command("gemma.voiceInstruction", { full_path(wav), uri, range }, answer)
  end
  vim.api.nvim_create_user_command("GemmaExplainImage", function(opts)
    local uri = vim.uri_from_bufnr(0)
    local target = opts.args ~= "" and full_path(opts.args) or vim.NIL
    h.show_float("…")
    h.command("gemma.explainImage", { target, uri, cursor_position() }, answer)
  end, { nargs = "?", complete = "file" })
  vim.api.nvim_create_user_command("GemmaCodeFromImage", function(opts)
    h.command("gemma.codeFromImage", { full_path(opts.args), vim.uri_from_bufnr(0),
      cursor_position() })
  end, { nargs = 1, complete = "file" })
  vim.api.nvim_create_user_command("GemmaVoice", function(opts)
    voice(opts.args, opts)
  end, { nargs = 1, complete = "file", range = true })
  vim.api.nvim_create_user_command("GemmaRecord", function(opts)
    local seconds = tonumber(opts.args) or 5
    M.record(seconds, function(wav)
      voice(wav, opts)
    end)
  end, { nargs = "?", range = true })
end

return M
