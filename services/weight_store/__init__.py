"""Weight store service: versioned, atomically published policy weights (issue #4)."""
