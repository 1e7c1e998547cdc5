"""How the policy is laid out over processes: one strategy object (single process, replicated, FSDP2) and the collectives under torchrun."""
