"""One module per page of the console: its routes, what it reads, what it renders."""
