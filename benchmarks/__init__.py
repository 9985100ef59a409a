"""The reference-posterior benchmark of pyro-flows: targets, guides, metrics and a runner."""
