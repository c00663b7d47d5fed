"""Measuring: quality under recycle scoring (`quality`), decoding speed (`speed`), the named prompt suites
(`suites`), Hugging Face baselines (`hf_baselines`), the differential harness (`differential`), the demo and charts."""
