"""Command-line tools: ``synthstrip`` (strip), ``synthseg`` (seg), ``synthmorph`` (morph).

Importing this package (every console entry point does, before torch or
numpy load) prepares the thread environment: passive OpenMP waiting and
OpenMP/BLAS pools no larger than the CPUs granted (see
:mod:`synthtools.threads`); what the user set is kept.
"""
from ..threads import prepare_environment

prepare_environment()
