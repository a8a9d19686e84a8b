"""`python -m tmpq` runs the same command line as `tmpq`."""

from tmpq.cli import app

if __name__ == "__main__":
    app(prog_name="tmpq")
