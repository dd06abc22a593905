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
  root_markers = { '.git', 'pyproject.toml', 'package.json', 'go.mod', 'Cargo.toml' },
}

local function command(opts)
  if opts.cmd then
    return opts.cmd
  end
  return { opts.python, '-m', 'hirope_lsp', 'serve' }
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
  vim.lsp.enable('hirope')
  vim.lsp.inline_completion.enable(true)
  if opts.accept_key then
    vim.keymap.set('i', opts.accept_key, function()
      if not vim.lsp.inline_completion.get() then
        return opts.accept_key
      end
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
