"""Lightning, Hydra, W&B and matplotlib: the AlignmentMonitor callback, the LightningModule and data, run
folders, loggers, figures, and the train / probe / report / demo entry points."""
