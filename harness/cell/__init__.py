"""The cell process: one run of one (model, task, method, variant, seed). It loads the model (models,
modelnames), lets the method prepare it, runs THE loop (loop, optim), evaluates, exports and times each
deployable form (deploy), and writes one record (:mod:`harness.records`). It is started by the driver
(:mod:`harness.driver`) and talks to it only through its cell file, its log and its record."""
