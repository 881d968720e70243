"""Task runners: each ``run(cfg)`` instantiates datamodule -> module -> callbacks -> loggers ->
trainer, fits, exports, and returns the metric named by ``cfg.task.metric``."""
