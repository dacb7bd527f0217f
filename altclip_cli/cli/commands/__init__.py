"""The altclip commands, one module per group of commands; `altclip_cli.cli` assembles them."""
