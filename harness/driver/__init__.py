"""The driver process: what `ftbench` runs. It reads and checks the suite (cli, suite), decides which cells run
(runner), starts each one in a process of its own (executor, forkserver, ray_executor), tunes on the validation
split (tune), and shows progress. It never trains: a cell does (:mod:`harness.cell`). The cheap checks import
neither torch nor transformers, so a typo is one line in well under a second."""
