"""Examples: a small shop that enqueues in its own transactions, and a demo traffic driver."""
