"""Differential privacy: clipping and noise (`mechanism`), DP-SGD (`dp_sgd`), and
the accountant that turns them into (epsilon, delta) and enforces the budget
(`accounting`). docs/privacy.md says which guarantee each mode gives."""
