"""Training: losses, the trainer (the DeepSpeed engine over the Layout's groups), the one stage driver
(driver.py), what stages share (joined.py, batches.py, text_cache.py) and the stages (stages/)."""
