"""Command-line tools: ``synthstrip`` (strip), ``synthseg`` (seg), ``synthmorph`` (morph)."""
