"""The tools wing: the command line (estimate, walkthrough, bench), the cache memory they measure (memory) and
loaders for the demo models that ship in packages. Nothing in the core imports it."""
