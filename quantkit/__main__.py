"""``python -m quantkit`` and the ``quantkit`` console script (also what ``torchrun -m quantkit
quantize ...`` runs on each process): the thread policy first, then the command line."""

import sys

from quantkit.threads import apply_thread_policy


def main() -> None:
    apply_thread_policy()  # before quantkit.cli imports torch
    from quantkit.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    sys.exit(main())
