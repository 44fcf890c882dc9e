"""`bastion plan`: how much accelerator memory and how many GPUs a model needs."""
