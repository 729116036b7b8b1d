"""The tiny foundations' builders and forgetting measurements: `make foundations` (`python -m tools.tiny.build`)
rebuilds the models shipped in `hf_specgen/tiny/models/` from their seeds; `make phenomenon`
(`python -m tools.tiny.phenomenon`) fine-tunes them, merges WiSE-FT and scores every model.

The data generators, loaders and evaluation suites they use stay in the package (`hf_specgen.tiny`): recipes,
tests and `make demo` need them at run time.
"""
