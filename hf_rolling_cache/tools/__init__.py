"""The tools wing: the command line (estimate, walkthrough, bench) and loaders for the demo models that ship in
packages. Nothing in the core imports it."""
