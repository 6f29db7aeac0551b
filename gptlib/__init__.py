"""gptlib: train GPT-2-small-style models from scratch and measure which interventions help."""

__version__ = "0.1.0"
