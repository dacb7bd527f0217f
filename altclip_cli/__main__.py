"""`python -m altclip_cli`: the same as the `altclip` command."""

from .cli import main

if __name__ == "__main__":
    main()
