"""`python -m together_async`: the same as the `together-async` command."""

from .cli import main

if __name__ == "__main__":
    main()
