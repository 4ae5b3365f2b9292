"""``python -m failover``: the same as the ``failover`` command."""

from failover.cli import main

raise SystemExit(main())
