"""The `llens` command line: a thin click layer over the latentlens library.

Each command lives in its own module and is imported only when invoked, so
`llens --help` and the SQL-only commands start without importing torch.
"""
