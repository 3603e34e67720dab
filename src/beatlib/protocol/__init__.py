"""Wire protocols: how our events look on the wire."""
