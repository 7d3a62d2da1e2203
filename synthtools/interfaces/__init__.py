"""Pipeline interfaces for the synthtools command-line tools (issue 35).

- :mod:`synthtools.interfaces.nipype`: nipype ``CommandLine`` interfaces
  (``pip install "synthtools[nipype]"``);
- :mod:`synthtools.interfaces.pydra`: Pydra ``ShellCommandTask`` builders
  (``pip install "synthtools[pydra]"``; pydra 0.x, the current release line).

Both drive the installed CLIs (``synthstrip``, ``synthseg``, ``synthmorph
register``/``apply``, ``synthtools-bids``) and name every output file in
their output specs, so downstream nodes connect without glue. Nothing is
imported here: ``import synthtools`` never needs nipype or pydra.
"""
