"""Models: architecture adapters, loading (zoo, local folders, the hub), hooks, generation, the zoo and micro models."""
