"""beatlib's own random generator, for ids, sampling and retry jitter.

Drawing from the global `random` would shift an app's seeded sequences (`random.seed(...)` in
its code or tests). Reseeded in a forked child, as the global one is, so workers differ.
"""

from __future__ import annotations

import os
import random

generator = random.Random()
os.register_at_fork(after_in_child=generator.seed)
getrandbits = generator.getrandbits
