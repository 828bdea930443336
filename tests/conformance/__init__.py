"""End-to-end conformance: pymerge against mergekit, and pymerge outputs loaded by transformers."""
