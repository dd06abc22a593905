vim.api.nvim_create_user_command('HiropeStatus', function()
  require('hirope').status()
end, { desc = 'hirope-lsp: show the server status' })
