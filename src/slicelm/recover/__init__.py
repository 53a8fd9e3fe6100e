"""Recovery fine-tuning after compression, on one process or several."""
