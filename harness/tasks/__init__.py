"""Tasks: the built-in ones (builtin), their examples and seeded splits (data), your own csv / jsonl / hub data
(userdata), and the two ways a model reads a task — the ``TaskIO`` contract of :mod:`harness.contract` — through
a classification head (classifier) or through prompts (prompting)."""
