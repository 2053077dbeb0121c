"""Plain torch on matrices, no model code: the metrics, SVDs, and the randomized range finder with its
error bounds."""
