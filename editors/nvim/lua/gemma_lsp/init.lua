-- gemma-lsp for Neovim >= 0.11: starts the server, draws inline completions as ghost text
-- and next-edit suggestions (gemma_lsp/next_edit.lua), and adds :GemmaExplain /
-- :GemmaRefactor / :GemmaDocstring / :GemmaStatus. No logic about models or prompts lives
-- here: the server does all of it.
local M = {}
local next_edit = require("gemma_lsp.next_edit")

local ns = vim.api.nvim_create_namespace("gemma_lsp_ghost")

M.config = {
  cmd = { "gemma-lsp" },
  filetypes = nil, -- nil: every filetype
  init_options = { gemma = {} },
  debounce_ms = 120,
  native_inline = true, -- on 0.12+ use vim.lsp.inline_completion
  keys = {
    accept = "<Tab>",
    accept_line = "<C-l>",
    accept_word = "<C-Right>",
    dismiss = "<C-]>",
    next = "<M-]>",
    prev = "<M-[>",
  },
  -- next-edit suggestions: <Tab> (normal mode) jumps to the suggested edit, then accepts it
  next_edit = next_edit.config,
}

-- state of the ghost text in the current buffer
local ghost = { buf = nil, row = nil, col = nil, items = {}, index = 1, timer = nil, seq = 0 }

local function client_for(buf)
  return vim.lsp.get_clients({ bufnr = buf, name = "gemma_lsp" })[1]
end

function M.clear()
  if ghost.buf and vim.api.nvim_buf_is_valid(ghost.buf) then
    vim.api.nvim_buf_clear_namespace(ghost.buf, ns, 0, -1)
  end
  ghost.items, ghost.index, ghost.row, ghost.col = {}, 1, nil, nil
end

local function current_text()
  local item = ghost.items[ghost.index]
  if not item then
    return nil
  end
  local text = item.insertText
  if type(text) == "table" then
    text = text.value
  end
  return text
end

local function draw()
  if not ghost.buf or not vim.api.nvim_buf_is_valid(ghost.buf) then
    return
  end
  vim.api.nvim_buf_clear_namespace(ghost.buf, ns, 0, -1)
  local text = current_text()
  if not text or text == "" then
    return
  end
  local lines = vim.split(text, "\n", { plain = true })
  local virt_lines = {}
  for i = 2, #lines do
    table.insert(virt_lines, { { lines[i], "Comment" } })
  end
  vim.api.nvim_buf_set_extmark(ghost.buf, ns, ghost.row, ghost.col, {
    virt_text = { { lines[1], "Comment" } },
    virt_text_pos = "inline",
    virt_lines = #virt_lines > 0 and virt_lines or nil,
    hl_mode = "combine",
  })
end

function M.request()
  local buf = vim.api.nvim_get_current_buf()
  local client = client_for(buf)
  if not client then
    return
  end
  local win = vim.api.nvim_get_current_win()
  local row, col = unpack(vim.api.nvim_win_get_cursor(win))
  ghost.seq = ghost.seq + 1
  local seq = ghost.seq
  local params = vim.lsp.util.make_position_params(win, client.offset_encoding)
  params.context = { triggerKind = 2 }
  client:request("textDocument/inlineCompletion", params, function(err, result)
    if err or seq ~= ghost.seq or not result then
      return
    end
    local items = result.items or result
    vim.schedule(function()
      local r, c = unpack(vim.api.nvim_win_get_cursor(0))
      if vim.api.nvim_get_current_buf() ~= buf or r ~= row or c ~= col then
        return -- the cursor moved on: this answer is stale
      end
      M.clear()
      ghost.buf, ghost.row, ghost.col, ghost.items = buf, row - 1, col, items or {}
      draw()
    end)
  end, buf)
end

local function schedule_request()
  M.clear()
  if ghost.timer then
    ghost.timer:stop()
  end
  ghost.timer = vim.defer_fn(M.request, M.config.debounce_ms)
end

-- insert part of the suggestion at the cursor (nil = all of it)
local function accept(part)
  local text = current_text()
  if not text then
    return false
  end
  local take = text
  if part == "line" then
    take = text:match("^[^\n]*\n?")
  elseif part == "word" then
    take = text:match("^%s*[%w_]+") or text:match("^%s*[^%w_%s]") or text
  end
  local buf, row, col = ghost.buf, ghost.row, ghost.col
  local lines = vim.split(take, "\n", { plain = true })
  vim.api.nvim_buf_set_text(buf, row, col, row, col, lines)
  local end_row = row + #lines - 1
  local end_col = (#lines == 1) and (col + #lines[1]) or #lines[#lines]
  vim.api.nvim_win_set_cursor(0, { end_row + 1, end_col })
  local rest = text:sub(#take + 1)
  if rest ~= "" then -- keep showing what is left
    ghost.items = { { insertText = rest } }
    ghost.index, ghost.row, ghost.col = 1, end_row, end_col
    vim.schedule(draw)
  else
    M.clear()
  end
  return true
end

function M.accept()
  return accept(nil)
end
function M.accept_line()
  return accept("line")
end
function M.accept_word()
  return accept("word")
end
function M.cycle(step)
  if #ghost.items > 1 then
    ghost.index = (ghost.index - 1 + step) % #ghost.items + 1
    draw()
  end
end
function M.visible()
  return current_text() ~= nil
end

local function map_keys(buf)
  local k = M.config.keys
  local function imap(lhs, fn, fallback)
    if not lhs then
      return
    end
    vim.keymap.set("i", lhs, function()
      if M.visible() then
        vim.schedule(fn)
        return ""
      end
      return fallback and vim.api.nvim_replace_termcodes(lhs, true, false, true) or ""
    end, { buffer = buf, expr = true, desc = "gemma-lsp" })
  end
  imap(k.accept, M.accept, true)
  imap(k.accept_line, M.accept_line, true)
  imap(k.accept_word, M.accept_word, true)
  imap(k.dismiss, M.clear, true)
  imap(k.next, function() M.cycle(1) end, false)
  imap(k.prev, function() M.cycle(-1) end, false)
end

-- Explain: a floating window filled with the text so far as $/progress reports stream in
local float = { buf = nil, win = nil }

local function show_float(text)
  if not float.buf or not vim.api.nvim_buf_is_valid(float.buf) then
    float.buf = vim.api.nvim_create_buf(false, true)
    vim.bo[float.buf].filetype = "markdown"
  end
  local lines = vim.split(text, "\n", { plain = true })
  vim.api.nvim_buf_set_lines(float.buf, 0, -1, false, lines)
  if not float.win or not vim.api.nvim_win_is_valid(float.win) then
    float.win = vim.api.nvim_open_win(float.buf, false, {
      relative = "cursor", row = 1, col = 0, width = math.min(80, vim.o.columns - 4),
      height = math.min(12, math.max(3, #lines)), style = "minimal", border = "rounded",
      title = " Gemma ", title_pos = "left",
    })
  end
end
M.explain_buffer = function()
  return float.buf
end

local function range_args(opts)
  local buf = vim.api.nvim_get_current_buf()
  local l1, l2 = opts.line1 - 1, opts.line2
  return vim.uri_from_bufnr(buf), {
    start = { line = l1, character = 0 },
    ["end"] = { line = l2, character = 0 },
  }
end

local tokens = 0
-- `on_result`: pass a workDoneToken, so that the server answers with the result once it is
-- done (progress comes on that token); without one long work answers at once and its edit
-- arrives as workspace/applyEdit
local function command(name, args, on_result)
  local client = client_for(0)
  if not client then
    vim.notify("gemma-lsp is not attached to this buffer", vim.log.levels.WARN)
    return
  end
  local params = { command = name, arguments = args }
  if on_result and name ~= "gemma.status" then
    tokens = tokens + 1
    params.workDoneToken = "gemma-nvim-" .. tokens
  end
  client:request("workspace/executeCommand", params,
    function(err, result)
      if err then
        vim.notify("Gemma: " .. (err.message or tostring(err)), vim.log.levels.WARN)
      elseif on_result then
        on_result(result)
      end
    end, 0)
end

local function user_commands()
  vim.api.nvim_create_user_command("GemmaExplain", function(opts)
    local uri, range = range_args(opts)
    show_float("…")
    command("gemma.explain", { uri, range }, function(result)
      if type(result) == "string" then
        show_float(result)
      end
    end)
  end, { range = true })
  vim.api.nvim_create_user_command("GemmaRefactor", function(opts)
    local uri, range = range_args(opts)
    command("gemma.refactor", { uri, range, opts.args })
  end, { range = true, nargs = "*" })
  vim.api.nvim_create_user_command("GemmaDocstring", function(opts)
    local uri, range = range_args(opts)
    command("gemma.docstring", { uri, range })
  end, { range = true })
  vim.api.nvim_create_user_command("GemmaStatus", function()
    command("gemma.status", {}, function(result)
      vim.notify(vim.inspect(result), vim.log.levels.INFO)
    end)
  end, {})
  vim.api.nvim_create_user_command("GemmaCancel", function()
    command("gemma.cancel", {})
  end, {})
  require("gemma_lsp.multimodal").commands({ command = command, show_float = show_float,
    range_args = range_args })
end

function M.setup(opts)
  M.config = vim.tbl_deep_extend("force", M.config, opts or {})
  local cfg = M.config
  next_edit.config = cfg.next_edit
  local handlers = {
    ["$/progress"] = function(err, result, ctx)
      local value = result and result.value or {}
      if value.kind == "report" and value.message and float.buf then
        vim.schedule(function() show_float(value.message) end)
      end
      return vim.lsp.handlers["$/progress"](err, result, ctx)
    end,
  }
  vim.lsp.config("gemma_lsp", {
    cmd = cfg.cmd,
    filetypes = cfg.filetypes,
    root_markers = { ".git" },
    init_options = cfg.init_options,
    handlers = handlers,
  })
  vim.lsp.enable("gemma_lsp")
  user_commands()

  local native = cfg.native_inline and vim.lsp.inline_completion ~= nil
  local group = vim.api.nvim_create_augroup("gemma_lsp", { clear = true })
  vim.api.nvim_create_autocmd("LspAttach", {
    group = group,
    callback = function(ev)
      local client = vim.lsp.get_client_by_id(ev.data.client_id)
      if not client or client.name ~= "gemma_lsp" then
        return
      end
      next_edit.attach(ev.buf, client, group, M.visible)
      if native then
        vim.lsp.inline_completion.enable(true, { bufnr = ev.buf })
        return
      end
      map_keys(ev.buf)
      vim.api.nvim_create_autocmd("TextChangedI", {
        group = group, buffer = ev.buf, callback = schedule_request,
      })
      vim.api.nvim_create_autocmd({ "InsertLeave", "BufLeave" }, {
        group = group, buffer = ev.buf, callback = M.clear,
      })
      vim.api.nvim_create_autocmd("CursorMovedI", {
        group = group, buffer = ev.buf,
        callback = function()
          local r, c = unpack(vim.api.nvim_win_get_cursor(0))
          if ghost.row and (r - 1 ~= ghost.row or c ~= ghost.col) then
            M.clear()
          end
        end,
      })
    end,
  })
end

return M
