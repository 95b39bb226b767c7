"""KFP v2 components: one folder per pipeline step, each a thin mapping onto ``candgen.*``."""
