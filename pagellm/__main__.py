"""`python -m pagellm ...`: the `pagellm` command without installing the package's entry point."""

from pagellm.entrypoints.cli import main

if __name__ == "__main__":
    main()
