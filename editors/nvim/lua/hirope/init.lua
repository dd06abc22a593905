-- hirope-lsp for Neovim >= 0.12: inline (ghost text) completions from a local model.
--   require('hirope').setup({ python = 'python3', settings = { promptBudget = 4096 } })
local M = {}

M.defaults = {
  -- command that starts the server; default: `<python> -m hirope_lsp serve`
  cmd = nil,
  python = 'python3',
  -- server settings (initializationOptions and workspace/didChangeConfiguration), e.g.
  -- { model = '/path/to/hf-model', device = 'cuda', promptBudget = 8192, hirope = { window = 512 } }
  settings = {},
  -- insert-mode key that accepts the suggestion; falls back to its normal meaning without one
  accept_key = '<Tab>',
  -- nil: every filetype
  filetypes = nil,
  -- tell the server where the cursor is (hirope/warm) when a buffer is entered or attached, when the
  -- cursor rests (CursorHold, CursorHoldI: 'updatetime') and after an accept, so it prefills that prompt
  -- before a suggestion is asked for; off as well with settings = { warmAhead = false }
  warm = true,
  root_markers = { '.git', 'pyproject.toml', 'package.json', 'go.mod', 'Cargo.toml' },
}

local function command(opts)
  if opts.cmd then
    return opts.cmd
  end
  return { opts.python, '-m', 'hirope_lsp', 'serve' }
end

-- Where each hirope client last saw the cursor (a hirope/warm or an inline completion request):
-- [client id] = { buffer, changedtick, row, col }.  Its prompt is prefilled already, and warming it again
-- would cancel the server's prefetch of the suggestion that follows the one on screen.
local last_spot = {}

local function spot(bufnr)
  local cursor = vim.api.nvim_win_get_cursor(0)
  return { bufnr, vim.api.nvim_buf_get_changedtick(bufnr), cursor[1], cursor[2] }
end

local function same_spot(a, b)
  return a ~= nil and a[1] == b[1] and a[2] == b[2] and a[3] == b[3] and a[4] == b[4]
end

local function warm_enabled()
  return M.options ~= nil and M.options.warm and (M.options.settings or {}).warmAhead ~= false
end

-- hirope/warm for the current window's cursor in buffer `bufnr` (the current one when nil), to each
-- hirope client attached to it (or to `only`), the position in that client's offset encoding.
-- `resting`: skip a client that last saw the cursor at this very spot of this text.
function M.warm(bufnr, resting, only)
  local current = vim.api.nvim_get_current_buf()
  bufnr = (bufnr == nil or bufnr == 0) and current or bufnr
  if bufnr ~= current or not warm_enabled() then
    return -- the position is the current window's
  end
  local here = spot(bufnr)
  for _, client in ipairs(vim.lsp.get_clients({ bufnr = bufnr, name = 'hirope' })) do
    if (only == nil or client.id == only) and not (resting and same_spot(last_spot[client.id], here)) then
      last_spot[client.id] = here
      pcall(function() -- a client that is stopping just drops it
        client:notify('hirope/warm', vim.lsp.util.make_position_params(0, client.offset_encoding))
      end)
    end
  end
end

local function hirope_client(id)
  local client = vim.lsp.get_client_by_id(id)
  return client ~= nil and client.name == 'hirope'
end

local function warm_autocmds()
  local group = vim.api.nvim_create_augroup('hirope.warm', { clear = true })
  vim.api.nvim_create_autocmd('BufEnter', {
    group = group,
    callback = function(args)
      M.warm(args.buf)
    end,
  })
  vim.api.nvim_create_autocmd('LspAttach', {
    group = group,
    callback = function(args)
      if hirope_client(args.data.client_id) then
        M.warm(args.buf, false, args.data.client_id)
      end
    end,
  })
  vim.api.nvim_create_autocmd({ 'CursorHold', 'CursorHoldI' }, {
    group = group,
    callback = function(args)
      M.warm(args.buf, true)
    end,
  })
  -- an inline completion request prefills its prompt itself: a rest at that spot needs no warm
  vim.api.nvim_create_autocmd('LspRequest', {
    group = group,
    callback = function(args)
      local request = args.data.request
      if request.type == 'pending' and request.method == 'textDocument/inlineCompletion'
          and args.buf == vim.api.nvim_get_current_buf() and hirope_client(args.data.client_id) then
        last_spot[args.data.client_id] = spot(args.buf)
      end
    end,
  })
  vim.api.nvim_create_autocmd('LspDetach', {
    group = group,
    callback = function(args)
      last_spot[args.data.client_id] = nil
    end,
  })
end

function M.setup(opts)
  if vim.fn.has('nvim-0.12') == 0 or not vim.lsp.inline_completion then
    vim.notify('hirope: Neovim 0.12 or newer is needed (vim.lsp.inline_completion)', vim.log.levels.ERROR)
    return
  end
  opts = vim.tbl_deep_extend('force', M.defaults, opts or {})
  M.options = opts
  vim.lsp.config('hirope', {
    cmd = command(opts),
    filetypes = opts.filetypes,
    root_markers = opts.root_markers,
    init_options = opts.settings,
    settings = { hirope = opts.settings },
  })
  if opts.warm then
    warm_autocmds()
  else
    pcall(vim.api.nvim_del_augroup_by_name, 'hirope.warm')
  end
  vim.lsp.enable('hirope')
  vim.lsp.inline_completion.enable(true)
  if opts.accept_key then
    vim.keymap.set('i', opts.accept_key, function()
      if not vim.lsp.inline_completion.get() then
        return opts.accept_key
      end
      -- get() applies the suggestion on the next loop turn; this runs after it, at the new cursor
      vim.schedule(function()
        M.warm()
      end)
    end, { expr = true, replace_keycodes = true, desc = 'hirope: accept the inline completion' })
  end
end

-- The server's status (model, device, cache counters), printed.
function M.status()
  for _, client in ipairs(vim.lsp.get_clients({ name = 'hirope' })) do
    client:request('hirope/status', {}, function(err, result)
      if err then
        vim.notify('hirope: ' .. err.message, vim.log.levels.ERROR)
      else
        vim.notify('hirope: ' .. vim.inspect(result))
      end
    end)
  end
end

return M
