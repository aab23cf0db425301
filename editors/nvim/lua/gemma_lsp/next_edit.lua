-- Next-edit suggestions for Neovim >= 0.11: after an edit and a pause, ask the server
-- (textDocument/copilotInlineEdit) where the next edit goes and draw it with extmarks: the
-- text it removes highlighted, the text it adds as virtual text. <Tab> jumps to it, then
-- accepts it; a key dismisses it. The server decides everything; this only draws and applies.
local M = {}

local ns = vim.api.nvim_create_namespace("gemma_lsp_next_edit")
local state = { buf = nil, edit = nil, client = nil, timer = nil, seq = 0 }

M.config = { enabled = true, debounce_ms = 300, keys = { accept = "<Tab>", dismiss = "<C-]>" } }

function M.current()
  return state.edit
end

-- a position's byte column in its line (positions come in the client's offset encoding)
local function byte_col(buf, pos, encoding)
  local line = vim.api.nvim_buf_get_lines(buf, pos.line, pos.line + 1, false)[1] or ""
  local ok, col = pcall(vim.str_byteindex, line, encoding, pos.character, false)
  return ok and col or #line
end

local function command(client, name, args)
  client:request("workspace/executeCommand", { command = name, arguments = args },
    function() end, state.buf)
end

function M.clear()
  if state.buf and vim.api.nvim_buf_is_valid(state.buf) then
    vim.api.nvim_buf_clear_namespace(state.buf, ns, 0, -1)
  end
  state.edit = nil
end

-- each part: the removed range highlighted, the new text after it as virtual text
local function draw(buf, edit, encoding)
  vim.api.nvim_buf_clear_namespace(buf, ns, 0, -1)
  for _, part in ipairs(edit.parts or { { range = edit.range, newText = edit.text } }) do
    local s, e = part.range.start, part.range["end"]
    local srow = s.line
    local scol = byte_col(buf, s, encoding)
    local erow = e.line
    local ecol = byte_col(buf, e, encoding)
    if srow ~= erow or scol ~= ecol then
      vim.api.nvim_buf_set_extmark(buf, ns, srow, scol, {
        end_row = erow, end_col = ecol, hl_group = "DiffDelete",
      })
    end
    local lines = vim.split(part.newText or "", "\n", { plain = true })
    local virt_lines = {}
    for i = 2, #lines do
      table.insert(virt_lines, { { lines[i], "DiffAdd" } })
    end
    if lines[1] ~= "" or #virt_lines > 0 then
      vim.api.nvim_buf_set_extmark(buf, ns, erow, ecol, {
        virt_text = { { lines[1], "DiffAdd" } }, virt_text_pos = "inline",
        virt_lines = #virt_lines > 0 and virt_lines or nil,
      })
    end
  end
end

function M.request(buf, client)
  if not M.config.enabled or not vim.api.nvim_buf_is_valid(buf) then
    return
  end
  state.seq = state.seq + 1
  local seq = state.seq
  local version = vim.lsp.util.buf_versions[buf]
  local params = vim.lsp.util.make_position_params(0, client.offset_encoding)
  params.textDocument.version = version
  client:request("textDocument/copilotInlineEdit", params, function(err, result)
    if err or seq ~= state.seq or not result or not result.edits or not result.edits[1] then
      return
    end
    vim.schedule(function()
      if vim.lsp.util.buf_versions[buf] ~= version then
        return -- edited since: the answer is for text that is gone
      end
      local edit = result.edits[1]
      M.clear()
      state.buf, state.edit, state.client = buf, edit, client
      draw(buf, edit, client.offset_encoding)
      client:notify("textDocument/didShowInlineEdit", { item = edit })
    end)
  end, buf)
end

function M.schedule(buf, client)
  M.clear()
  if state.timer then
    state.timer:stop()
  end
  state.timer = vim.defer_fn(function() M.request(buf, client) end, M.config.debounce_ms)
end

-- <Tab>: away from the edit, jump to it; on its first line, apply it
function M.accept()
  local edit, client, buf = state.edit, state.client, state.buf
  if not edit or buf ~= vim.api.nvim_get_current_buf() then
    return false
  end
  local row = vim.api.nvim_win_get_cursor(0)[1] - 1
  local start = edit.range.start
  if row ~= start.line then
    local col = byte_col(buf, start, client.offset_encoding)
    vim.api.nvim_win_set_cursor(0, { start.line + 1, col })
    return true
  end
  M.clear()
  vim.lsp.util.apply_text_edits({ { range = edit.range, newText = edit.text } }, buf,
    client.offset_encoding)
  if edit.command then
    command(client, edit.command.command, edit.command.arguments)
  end
  return true
end

function M.dismiss()
  local edit, client = state.edit, state.client
  if not edit then
    return false
  end
  M.clear()
  local id = edit.command and edit.command.arguments and edit.command.arguments[1]
  if id then
    command(client, "gemma.nextEdit.reject", { id })
  end
  return true
end

function M.attach(buf, client, group, ghost_visible)
  if not M.config.enabled then
    return
  end
  local keys = M.config.keys
  local function map(mode, lhs, fn)
    if not lhs then
      return
    end
    vim.keymap.set(mode, lhs, function()
      if state.edit and not (mode == "i" and ghost_visible()) then
        vim.schedule(fn)
        return ""
      end
      return vim.api.nvim_replace_termcodes(lhs, true, false, true)
    end, { buffer = buf, expr = true, desc = "gemma-lsp next edit" })
  end
  map("n", keys.accept, M.accept)
  map("n", keys.dismiss, M.dismiss)
  vim.api.nvim_create_autocmd({ "TextChanged", "InsertLeave" }, {
    group = group, buffer = buf, callback = function() M.schedule(buf, client) end,
  })
  vim.api.nvim_create_autocmd("TextChangedI", {
    group = group, buffer = buf, callback = M.clear,
  })
end

return M
