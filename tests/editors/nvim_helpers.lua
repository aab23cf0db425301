-- Loaded into the Neovim under test (tests/editors/test_nvim.py): small probes for --remote-expr.
local gl = require("gemma_lsp")
_G.T = {}
function T.attached()
  return #vim.lsp.get_clients({ bufnr = 0, name = "gemma_lsp" }) > 0
end
function T.ghost()
  local ns = vim.api.nvim_get_namespaces()["gemma_lsp_ghost"]
  local marks = ns and vim.api.nvim_buf_get_extmarks(0, ns, 0, -1, { details = true }) or {}
  if not marks[1] then return "" end
  local text = ""
  for _, chunk in ipairs(marks[1][4].virt_text or {}) do text = text .. chunk[1] end
  for _, line in ipairs(marks[1][4].virt_lines or {}) do text = text .. "\n" .. line[1][1] end
  return text
end
function T.buffer()
  return table.concat(vim.api.nvim_buf_get_lines(0, 0, -1, false), "\n")
end
function T.mode()
  return vim.api.nvim_get_mode().mode
end
function T.explain()
  local b = gl.explain_buffer()
  return b and table.concat(vim.api.nvim_buf_get_lines(b, 0, -1, false), "\n") or ""
end
T.messages = {}
local notify = vim.notify
vim.notify = function(msg, level, opts)
  table.insert(T.messages, msg)
  return notify(msg, level, opts)
end
-- run the code action of `kind` (docstring, refactor) for lines l1..l2 (0-based, end
-- exclusive) through Neovim's own vim.lsp.buf.code_action, as a user picking it would: it
-- resolves the action, applies its edit if any and runs its command (the server answers at
-- once and sends the edit as workspace/applyEdit)
function T.code_action(kind, l1, l2)
  T.messages = {}
  vim.lsp.buf.code_action({
    apply = true,
    range = { start = { l1 + 1, 0 }, ["end"] = { l2, 0 } },
    filter = function(a) return a.data ~= nil and a.data.kind == kind end,
  })
  return true
end
-- the next-edit suggestion as drawn: removed text (highlighted ranges) and added virtual text
function T.next_edit()
  local ns = vim.api.nvim_get_namespaces()["gemma_lsp_next_edit"]
  local marks = ns and vim.api.nvim_buf_get_extmarks(0, ns, 0, -1, { details = true }) or {}
  local out = { removed = {}, added = {} }
  for _, m in ipairs(marks) do
    local d = m[4]
    if d.hl_group == "DiffDelete" then
      local lines = vim.api.nvim_buf_get_text(0, m[2], m[3], d.end_row, d.end_col, {})
      table.insert(out.removed, table.concat(lines, "\n"))
    end
    for _, chunk in ipairs(d.virt_text or {}) do table.insert(out.added, chunk[1]) end
  end
  return out
end
function T.cursor()
  return vim.api.nvim_win_get_cursor(0)
end
