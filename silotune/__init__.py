"""silotune: federated post-training of open-source language models across data silos.

The library is plain Python over torch, transformers and peft. It never imports
Prefect: the orchestration layer (``flows/`` and ``tasks/``) calls into it.
"""

__version__ = "0.1.0"
