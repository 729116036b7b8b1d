"""Research tooling beside the library (not installed with `hf_specgen`): run from the repository root as
`python -m tools.<name>`, as the Makefile does."""
