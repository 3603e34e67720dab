"""`python -m beatlib.receiver --port 8200 --db beatlib.sqlite3 [--secret-token X]`."""

import sys

from beatlib.receiver.server import main

sys.exit(main())
