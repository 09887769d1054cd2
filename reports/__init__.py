"""Report rendering. For now: the plain summary table printed at the end of a suite (terminal, Markdown, CSV)."""
