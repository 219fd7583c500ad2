"""entroclip: RL with verifiable rewards for language models, with policy entropy measured and controlled."""

__version__ = "0.1.0"
