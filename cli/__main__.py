"""`python -m latentlens.cli` runs the `llens` command."""

from latentlens.cli.main import cli

if __name__ == "__main__":
    cli()
