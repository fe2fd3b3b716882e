"""`python -m fd2_client …` runs the `fd2-client` command."""

from fd2_client.cli import main

raise SystemExit(main())
