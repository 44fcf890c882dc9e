"""Fine-tuning: datasets from internal documents, LoRA training jobs, adapter validation.

The gateway side (this package, minus `worker.py`) never imports torch: training and the
held-out loss run in a separate process under the ML virtualenv (the engine venv by default).
"""
